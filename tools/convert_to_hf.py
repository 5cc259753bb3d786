#!/usr/bin/env python
"""megatron checkpoint (any TP/PP/CP) -> Hugging Face folder.

The same command as ``harpe-convert-to-hf``; it lives in
:mod:`harpe_megatron.cli.convert_to_hf` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
