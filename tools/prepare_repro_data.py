#!/usr/bin/env python
"""Build the reproduction corpus of a tier (docs/reproduction.md).

The same command as ``harpe-prepare-repro-data``; it lives in
:mod:`harpe_megatron.cli.prepare_repro_data` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.prepare_repro_data import main

if __name__ == "__main__":
    sys.exit(main())
