import sys

from distclip.cli import main

sys.exit(main())
