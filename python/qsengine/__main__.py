import sys

from qsengine.cli import main

sys.exit(main())
