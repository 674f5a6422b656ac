"""`python -m layerzero ...` runs the `layerzero` command."""

import sys

from .cli import main

sys.exit(main())
