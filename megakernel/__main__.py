"""`python -m megakernel`: the command line (megakernel/cli.py)."""
import sys

from .cli import main

sys.exit(main())
