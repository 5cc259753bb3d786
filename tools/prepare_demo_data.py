#!/usr/bin/env python
"""Build the demo data from text already on this machine: corpus, tokenizer, indexed dataset.

The same command as ``harpe-prepare-demo-data``; it lives in
:mod:`harpe_megatron.cli.prepare_demo_data` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.prepare_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
