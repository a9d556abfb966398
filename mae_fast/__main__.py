import sys

from mae_fast.cli import main

sys.exit(main())
