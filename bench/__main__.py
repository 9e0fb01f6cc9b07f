"""``python -m bench``: the same as ``pyengine-bench``."""

import sys

from bench.cli import main

sys.exit(main())
