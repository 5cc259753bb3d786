"""The Slurm cluster the tests in this folder submit to (tests/slurm/cluster.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import SlurmCluster

GRACE_TIME_S = 30  # the preemptable partition's GraceTime


@pytest.fixture(scope="module")
def slurm():
    """A two-node cluster for this module; skipped, with the reason, where Slurm cannot run (not
    root, no apt-get). In CI (CI=true) it must run: failing to start is a failure there.

    Its directory is directly under /tmp: munged (which runs as the munge user) needs every
    directory above its socket to be open to all users, which pytest's tmp_path is not."""
    directory = Path(tempfile.mkdtemp(prefix="harpe-slurm-", dir="/tmp"))
    cluster = SlurmCluster(directory, nodes=2, grace_time_s=GRACE_TIME_S)
    try:
        reason = cluster.start()
        if reason is not None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"CI must run the Slurm tests, but the cluster cannot start: {reason}")
            pytest.skip(f"no Slurm cluster on this machine: {reason}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
