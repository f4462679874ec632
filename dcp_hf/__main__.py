import sys

from dcp_hf.cli import main

sys.exit(main())
