import sys

from e2edict.cli import main

sys.exit(main())
