#!/usr/bin/env python
"""Long-context evaluation of an exported Hugging Face folder, and reports comparing runs.

The same command as ``harpe-eval-long-context``; it lives in
:mod:`harpe_megatron.cli.eval_long_context` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.eval_long_context import main

if __name__ == "__main__":
    sys.exit(main())
