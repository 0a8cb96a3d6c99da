"""reprozoo: research methods as PyTorch Lightning components, plus a model zoo."""

from reprozoo._distributed import destroy_process_group_at_exit

__version__ = "0.1.0"

destroy_process_group_at_exit()  # every process of a CPU DDP run imports reprozoo; see reprozoo/_distributed.py
