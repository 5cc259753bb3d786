"""Two nodes without Slurm, as the README starts them: one ``bash scripts/pretrain_harpe.sh`` per
node with ``NNODES=2 NODE_RANK=0|1 MASTER_ADDR=127.0.0.1 GPUS_PER_NODE=1`` (here both on this
host), the tiny TP=2 model split across the two "nodes".

A node dies (SIGKILL to its launcher, torchrun and rank at once): the other node's launcher exits
76 within the documented bound (docs/reliability.md), naming the lost rank; the next launch of both
nodes resumes from `latest`, and the per-step losses equal those of the same run on one node.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from harpe_megatron.distributed.bringup import free_port
from harpe_megatron.training.reliability.exit_codes import PEER_FAILURE_EXIT_CODE
from tests.distributed.reliability_launch import (
    LAUNCH_MARKER,
    MULTINODE_STEPS,
    launcher_env,
    leftover_processes,
    multinode_overrides,
    processes_with_env,
    read_metrics,
    start_launcher,
    wait_for_text,
)

pytestmark = pytest.mark.distributed

# A lost node is noticed at the survivors' next collective (at once with gloo: the connection
# breaks), the watchdog waits up to 3 x its heartbeat interval + 1 s to name the lost rank (16 s with
# training.hang_timeout_s=60), and the launcher exits; a step here is well under a second.
LOST_NODE_BOUND_S = 16 + 10


def _start_nodes(run: Path, overrides: list[str], tag: str) -> list:
    port = str(free_port())
    return [start_launcher(overrides, run.parent / f"{tag}_node{n}.log",
                           launcher_env(f"{run}-{tag}-node{n}", NNODES="2", NODE_RANK=str(n), GPUS_PER_NODE="1",
                                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for n in (0, 1)]


def test_two_nodes_match_one_node_and_a_lost_node_ends_the_other_with_76(demo_data, one_node_reference, tmp_path):
    run = tmp_path / "run"
    overrides = multinode_overrides(demo_data, run)
    nodes = _start_nodes(run, overrides, "first")
    try:
        wait_for_text(run / "checkpoints" / "latest", "iter_0000008", timeout=300, alive=nodes[0])
        # node 1 dies: its launcher (torchrun) and its rank, at once
        victims = processes_with_env(LAUNCH_MARKER, f"{run}-first-node1")
        assert len(victims) >= 2, victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        code = nodes[0].wait(timeout=120)
        took = time.monotonic() - killed
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    log = (tmp_path / "first_node0.log").read_text()
    assert code == PEER_FAILURE_EXIT_CODE, log[-3000:]
    assert took < LOST_NODE_BOUND_S, f"node 0 took {took:.1f} s to exit after node 1 died"
    assert "because rank 1 (host" in log and "has exited" in log, log[-3000:]
    assert f"[pretrain_harpe] exit {PEER_FAILURE_EXIT_CODE} (a rank died or hung" in log
    assert leftover_processes(f"{run}-first-node0") == [] and leftover_processes(f"{run}-first-node1") == []
    saved = int((run / "checkpoints" / "latest").read_text().split("_")[1])
    print(f"\nnode 1 killed after iter_{saved}: node 0 exited {code} {took:.1f} s later")

    lines = len((run / "metrics.jsonl").read_text().splitlines())
    again = _start_nodes(run, overrides, "again")
    codes = [p.wait(timeout=300) for p in again]
    assert codes == [0, 0], (tmp_path / "again_node0.log").read_text()[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'iter_{saved:07d}'}" in (tmp_path / "again_node0.log").read_text()
    resumed = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()[lines:]]
    assert resumed == list(range(saved + 1, MULTINODE_STEPS + 1))
    metrics = read_metrics(run)
    assert {s: m["loss"] for s, m in metrics.items()} == {s: m["loss"] for s, m in one_node_reference.items()}
