"""`python -m terdit.cli` (as torchrun runs it): the `terdit` command."""

import sys

from terdit.cli import main

sys.exit(main())
