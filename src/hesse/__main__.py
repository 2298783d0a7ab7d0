"""``python -m hesse`` is the ``hesse`` command."""

import sys

from hesse.cli import main

sys.exit(main())
