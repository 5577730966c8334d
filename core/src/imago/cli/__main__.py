"""``python -m imago.cli``."""

import sys

from . import main

sys.exit(main())
