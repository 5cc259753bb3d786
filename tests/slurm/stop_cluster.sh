#!/usr/bin/env bash
# stop_cluster.sh DIR: cancel the jobs of the cluster start_cluster.sh DIR started, then stop its
# daemons by their recorded pids (nothing else on the host is touched). DIR stays (logs).
D="${1:?usage: stop_cluster.sh DIR}"
export PATH="$PATH:/usr/sbin"
export SLURM_CONF="$D/slurm.conf"
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

ctld=$(cat "$D/run/slurmctld.pid" 2>/dev/null || true)
if alive "$ctld" && [ -s "$SLURM_CONF" ]; then
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    scancel --full $jobs 2>/dev/null || true
    for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

stop() {  # pidfile: SIGTERM, up to 10 s, then SIGKILL
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do alive "$pid" || break; sleep 0.25; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$1"
}
for f in "$D"/run/slurmd.n*.pid; do
  case "$f" in *.daemon.pid) continue ;; esac
  [ -e "$f" ] && stop "$f"
done
stop "$D/run/slurmctld.pid"
stop "$D/run/munged.pid"
exit 0
