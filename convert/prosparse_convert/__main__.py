"""python -m prosparse_convert: the prosparse-convert command."""

import sys

from .cli import main

sys.exit(main())
