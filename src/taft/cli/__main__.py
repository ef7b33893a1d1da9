"""`python -m taft.cli`: the `taft` command."""

import sys

from taft.cli import main

sys.exit(main())
