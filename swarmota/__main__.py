"""``python -m swarmota``: the ``swarmota`` command."""

import sys

from swarmota.cli import main

sys.exit(main())
