#!/usr/bin/env python
"""Check a run's data and tokenizer without training (the checks training runs first).

The same command as ``harpe-check-data``; it lives in
:mod:`harpe_megatron.cli.check_data` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.check_data import main

if __name__ == "__main__":
    sys.exit(main())
