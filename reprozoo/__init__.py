"""reprozoo: research methods as PyTorch Lightning components, plus a model zoo."""

__version__ = "0.1.0"
