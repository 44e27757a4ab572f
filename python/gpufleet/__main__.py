"""`python -m gpufleet` is the `gpufleet` command."""
import sys

from .cli import main

sys.exit(main())
