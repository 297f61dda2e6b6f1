"""`python -m visionrecipe ...` (and `torchrun -m visionrecipe train ...`)."""

import sys

from visionrecipe.cli import main

sys.exit(main())
