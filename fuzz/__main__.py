"""``python -m fuzz TARGET [--minutes N] [--jobs J]``: see :mod:`fuzz.run`."""

from .run import main

raise SystemExit(main())
