import sys

from ldmscale.launch.cli import main

sys.exit(main())
