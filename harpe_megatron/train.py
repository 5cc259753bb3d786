"""``python -m harpe_megatron.train --config CONFIG [key.path=value ...]``: the training command.

Kept at this path for the launcher and the documentation; the command is
:mod:`harpe_megatron.cli.train` (also installed as ``harpe-train``).
"""

import sys

from harpe_megatron.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
