"""``python -m applications.distill``: see cli.py."""

import sys

from .cli import main

sys.exit(main())
