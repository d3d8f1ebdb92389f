"""`python -m pdserve ...` is the `pdserve` command."""

import sys

from pdserve.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
