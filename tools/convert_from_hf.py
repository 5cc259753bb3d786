#!/usr/bin/env python
"""Hugging Face Llama folder -> megatron distributed checkpoint (initial weights for training).

The same command as ``harpe-convert-from-hf``; it lives in
:mod:`harpe_megatron.cli.convert_from_hf` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main())
