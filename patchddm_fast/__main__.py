"""`python -m patchddm_fast ...` runs the `patchddm` command."""

import sys

from .cli import main

sys.exit(main())
