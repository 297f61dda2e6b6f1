"""`python -m visionrecipe ...` (and `torchrun -m visionrecipe train ...`)."""

import sys

from .cli import main

sys.exit(main())
