import sys

from tunelab.cli import main

sys.exit(main())
