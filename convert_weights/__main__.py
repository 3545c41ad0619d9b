"""`python -m convert_weights`: see convert_weights/__init__.py."""

import sys

from convert_weights import main

if __name__ == "__main__":
    sys.exit(main())
