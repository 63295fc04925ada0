"""``python -m workbench``: the ``workbench`` command, also as ``torchrun --nproc-per-node N -m workbench measure``."""

import sys

from workbench.cli import main

if __name__ == "__main__":  # imported (by a walk over the package), it does nothing
    sys.exit(main())
