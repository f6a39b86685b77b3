import sys

from fedsubtype.cli import main

sys.exit(main())
