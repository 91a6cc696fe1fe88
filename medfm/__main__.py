"""``python -m medfm``: the ``medfm`` command."""

import sys

from medfm.cli import main

sys.exit(main())
