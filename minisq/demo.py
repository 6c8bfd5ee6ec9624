"""``python -m minisq.demo``: the demo, as documented (the program is :mod:`minisq.cli.demo`)."""

import sys

from .cli.demo import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m minisq.demo"))
