"""``python -m router``: the router process (see :mod:`router.server`)."""

import sys

from router.main import main

if __name__ == "__main__":
    sys.exit(main())
