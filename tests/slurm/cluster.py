"""A real Slurm cluster of emulated nodes on this host, for the tests (tests/slurm/start_cluster.sh).

:class:`SlurmCluster` starts it in a directory of its own (config, munge, state, logs, ports: see
the script), runs Slurm's commands against it (``SLURM_CONF`` in their environment only) and stops
it. :meth:`SlurmCluster.start` returns None with the reason where Slurm cannot run here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from tests.distributed.reliability_launch import processes_with_env

__all__ = ["SlurmCluster"]

HERE = Path(__file__).resolve().parent
NOT_AVAILABLE = 3  # start_cluster.sh: Slurm cannot run here


class SlurmCluster:
    def __init__(self, directory: Path, nodes: int = 2, grace_time_s: int = 30):
        self.dir, self.nodes, self.grace_time_s = Path(directory), nodes, grace_time_s
        self.conf = self.dir / "slurm.conf"
        self.env = self._own(os.environ)

    def _own(self, env) -> dict[str, str]:
        """``env`` pointed at this cluster: no SLURM_* of a surrounding allocation or cluster."""
        own = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
        path = env.get("PATH", "")
        if "/usr/sbin" not in path.split(":"):
            path += ":/usr/sbin"
        return dict(own, SLURM_CONF=str(self.conf), PATH=path)

    def start(self) -> Optional[str]:
        """Start it; None when it is up, else why it cannot run (Slurm missing and not installable)."""
        done = subprocess.run(["bash", str(HERE / "start_cluster.sh"), str(self.dir), str(self.nodes)],
                              env=dict(self.env, GRACE_TIME=str(self.grace_time_s)), capture_output=True,
                              text=True, timeout=600)
        if done.returncode == NOT_AVAILABLE:
            return done.stderr.strip()
        assert done.returncode == 0, f"start_cluster.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        return None

    def stop(self) -> None:
        subprocess.run(["bash", str(HERE / "stop_cluster.sh"), str(self.dir)], env=self.env, capture_output=True,
                       timeout=120)

    def run(self, *command: str, check: bool = True) -> str:
        done = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}: {done.stderr}"
        return done.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=self._own(env),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as key -> value (JobState, ExitCode, Restarts, TimeLimit, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: int, states: set[str], timeout: float, restarts: Optional[int] = None) -> dict:
        """Block until the job is in one of ``states`` (and has ``restarts`` restarts, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states and (restarts is None or int(info.get("Restarts", 0)) == restarts):
                return info
            assert time.monotonic() < deadline, f"job {job_id} not in {states} (restarts {restarts}) after " \
                                                f"{timeout:.0f} s: {info.get('JobState')}, {info.get('Restarts')}"
            time.sleep(0.5)

    def node_state(self, node: str) -> str:
        return self.run("sinfo", "-h", "-N", "-n", node, "-o", "%T").split("\n")[0].strip()

    def kill_node(self, node: str) -> list[int]:
        """A node dies: its slurmd and every process of the jobs on it (the job's processes carry
        SLURMD_NODENAME=node; the step daemons, slurmstepd, are found by the node name in their
        command line) get SIGKILL at once. Returns the pids killed."""
        pids = [int((self.dir / "run" / f"slurmd.{node}.pid").read_text())]
        pids += processes_with_env("SLURMD_NODENAME", node)
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if cmd.startswith("slurmstepd") and self._stepd_node(int(proc.name)) == node:
                    pids.append(int(proc.name))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def _stepd_node(self, pid: int) -> Optional[str]:
        """The node a slurmstepd serves: it holds that node's slurmd log open."""
        logs = re.compile(re.escape(str(self.dir / "log")) + r"/slurmd\.(\w+)\.log$")
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                match = logs.match(os.readlink(fd))
                if match:
                    return match.group(1)
        except OSError:
            return None
        return None

    def restart_node(self, node: str) -> None:
        """Start the node's slurmd again (it returns to service: ReturnToService=2)."""
        log = open(self.dir / "log" / f"slurmd.{node}.out", "a")
        proc = subprocess.Popen(["/usr/sbin/slurmd", "-D", "-N", node, "-f", str(self.conf)], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        (self.dir / "run" / f"slurmd.{node}.pid").write_text(f"{proc.pid}\n")
