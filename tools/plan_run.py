#!/usr/bin/env python
"""Memory and FLOP plan of a config at full scale, without a GPU (see docs/performance.md).

    python tools/plan_run.py --config CONFIG [key.path=value ...] --gpu-memory-gib 80 [--nodes N] [--json OUT]

example:
  python tools/plan_run.py --config configs/llama2_7b_harpe_128k.yaml --nodes 4 --json plan.json
"""

from __future__ import annotations

import sys

from harpe_megatron.cli import quiet_library_warnings

if __name__ == "__main__":
    quiet_library_warnings()
    from harpe_megatron.training.plan_run import main

    sys.exit(main())
