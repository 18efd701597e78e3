import sys

from pyvirtiofsd.cli import main

sys.exit(main())
