"""``python -m workbench``: the ``workbench`` command, also as ``torchrun --nproc-per-node N -m workbench measure``."""

import sys

from workbench.cli import main

sys.exit(main())
