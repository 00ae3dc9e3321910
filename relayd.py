#!/usr/bin/env python3
"""Entry point: ``python relayd.py --config FILE``."""

import sys

from relayd.cli import main

if __name__ == "__main__":
    sys.exit(main())
