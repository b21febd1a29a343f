"""``python -m fewstep ...`` runs the command line (``fewstep --help``)."""

import sys

from .cli import main

sys.exit(main())
