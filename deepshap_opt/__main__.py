"""``python -m deepshap_opt``: the ``deepshap-opt`` command line (see :mod:`deepshap_opt.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
