"""``python -m minisq`` runs the demo (same as ``python -m minisq.demo``)."""

import sys

from .demo import main

sys.exit(main())
