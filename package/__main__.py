"""``python -m foliosync``: the ``foliosync`` command, for environments without its script."""

import sys

from foliosync.client.cli import main

sys.exit(main())
