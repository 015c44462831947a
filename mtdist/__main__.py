import sys

from mtdist.cli import main

sys.exit(main())
