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

# SIGTERM to every daemon at once (each takes a few seconds to exit), up to 10 s, then SIGKILL
pids=()
for f in "$D"/run/slurmd.n*.pid "$D/run/slurmctld.pid" "$D/run/munged.pid"; do
  case "$f" in *.daemon.pid) continue ;; esac
  pid=$(cat "$f" 2>/dev/null) || continue
  rm -f "$f"
  alive "$pid" && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
done
for _ in $(seq 40); do
  left=()
  for pid in "${pids[@]}"; do alive "$pid" && left+=("$pid"); done
  [ "${#left[@]}" -eq 0 ] && exit 0
  sleep 0.25
done
kill -KILL "${left[@]}" 2>/dev/null
exit 0
