import sys

from femurrisk.cli import main

sys.exit(main())
