"""A plugin module that calls sys.exit at import (a hostile plugin)."""

import sys

sys.exit(3)
