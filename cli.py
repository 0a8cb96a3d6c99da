"""Entry point: ``python cli.py {fit,validate,test,predict,zoo} ...`` (the ``reprozoo`` console script)."""

import sys

from reprozoo.cli import main

if __name__ == "__main__":
    sys.exit(main())
