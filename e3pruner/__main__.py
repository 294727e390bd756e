import sys

from e3pruner.cli import main

sys.exit(main())
