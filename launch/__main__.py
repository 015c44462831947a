"""`python -m launch ...` is `python -m launch.submit ...`."""

import sys

from launch.submit import main

sys.exit(main())
