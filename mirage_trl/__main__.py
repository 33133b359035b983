"""`python -m mirage_trl` is the `mirage-trl` command."""

import sys

from .cli import main

sys.exit(main())
