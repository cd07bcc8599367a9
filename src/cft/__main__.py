import sys

from cft.cli import main

sys.exit(main())
