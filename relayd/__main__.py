"""``python -m relayd``: the same command line as ``relayd``."""

import sys

from .cli import main

sys.exit(main())
