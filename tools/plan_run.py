#!/usr/bin/env python
"""Plan a config at full scale.

The same command as ``harpe-plan-run``; it lives in
:mod:`harpe_megatron.cli.plan_run` (this file keeps the documented path working).
"""

import sys

from harpe_megatron.cli.plan_run import main

if __name__ == "__main__":
    sys.exit(main())
