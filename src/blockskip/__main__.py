import sys

from blockskip.cli import main

sys.exit(main())
