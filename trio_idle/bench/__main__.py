"""``python -m trio_idle.bench``: see :mod:`trio_idle.bench.harness`."""

import sys

from trio_idle.bench.harness import main

sys.exit(main())
