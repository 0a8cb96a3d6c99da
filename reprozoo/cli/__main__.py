"""``python -m reprozoo.cli ...``, as ``python cli.py ...``."""

import sys

from reprozoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
