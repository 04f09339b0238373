"""``python -m anomalib_moleflow`` runs the ``anomalib-moleflow`` command line."""

import sys

from anomalib_moleflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
