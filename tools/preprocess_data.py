#!/usr/bin/env python
"""JSONL -> length-upsampled megatron indexed dataset (<prefix>.bin / <prefix>.idx).

The same command as ``harpe-preprocess-data``; it lives in
:mod:`harpe_megatron.cli.preprocess_data` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
