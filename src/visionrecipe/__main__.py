"""`python -m visionrecipe ...` (and `torchrun -m visionrecipe train ...`)."""

import os
import sys

from visionrecipe.cli import main

if os.environ.get("VISIONRECIPE_STATUS_DIR"):  # launch.STATUS_ENV: a worker of `train --nproc N`
    from visionrecipe.train.launch import worker_main

    sys.exit(worker_main(main, sys.argv[1:]))
sys.exit(main())
