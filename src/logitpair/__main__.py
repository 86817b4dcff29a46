import sys

from logitpair.cli import main

sys.exit(main())
