"""``python -m awq_ao.cli``."""

import sys

from awq_ao.cli.entry import main

sys.exit(main())
