#!/usr/bin/env python
"""Train a small Llama-style sentencepiece tokenizer (for the demo and tests; real runs use the.

The same command as ``harpe-train-tokenizer``; it lives in
:mod:`harpe_megatron.cli.train_tokenizer` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
