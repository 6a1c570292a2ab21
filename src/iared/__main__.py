"""``python -m iared``: the same as the ``iared`` command."""

import sys

from iared.cli import main

sys.exit(main())
