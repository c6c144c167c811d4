"""``python -m glimpseprune.cli ...`` (e.g. under ``accelerate launch``): the ``glimpseprune`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
