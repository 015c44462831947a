"""`python -m mtdist.launch ...` is `mtdist submit ...`."""

import sys

from mtdist.launch.submit import main

sys.exit(main())
