import sys

from rlrouter.cli import main

sys.exit(main())
