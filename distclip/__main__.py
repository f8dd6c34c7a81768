import sys

from distclip.train.cli import main

sys.exit(main())
