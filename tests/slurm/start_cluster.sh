#!/usr/bin/env bash
# start_cluster.sh DIR [NNODES]: a real Slurm cluster on this host for the tests (not part of the
# product). One slurmctld, one slurmd per emulated node (n1..nN, all on this host), and its own
# munged, all started from DIR and stopped by stop_cluster.sh DIR.
#
#   bash tests/slurm/start_cluster.sh /tmp/harpe-slurm-XXXX 2 && export SLURM_CONF=/tmp/harpe-slurm-XXXX/slurm.conf
#
# Nothing system-wide is configured: the cluster's config is DIR/slurm.conf (clients and daemons
# read it through SLURM_CONF), its munge key and socket are DIR/munge/, its state, spool and logs
# are under DIR, and its ports are free ones picked at start (written into slurm.conf). So several
# clusters (two test sessions) can run on one host, and /etc/slurm and the system munged are left
# alone. The Debian packages (slurmctld slurmd slurm-client munge) are installed if missing, which
# needs root and apt-get; the daemons run as root, without systemd or cgroups.
#
# Partitions: debug (default; preemptable: PreemptMode=REQUEUE, GraceTime=GRACE_TIME s [30]) and
# urgent (PriorityTier 10, preempts debug). Preemption sends SIGTERM (Slurm 22.05's default);
# EXTRA_SLURM_CONF adds lines, e.g. SlurmctldParameters=preempt_send_user_signal (the job's --signal
# instead). cred_expire=10 makes a requeued job eligible again
# after ~11 s (the default, 120 s, would add two minutes per requeue).
# Exit codes: 0 cluster up (all nodes idle), 3 Slurm cannot run here (not root and not installed,
# apt-get failed), 1 a daemon did not come up (DIR/log has its log).
set -euo pipefail
D="${1:?usage: start_cluster.sh DIR [NNODES]}"
N="${2:-2}"
GRACE_TIME="${GRACE_TIME:-30}"
PACKAGES=(slurmctld slurmd slurm-client munge)
mkdir -p "$D"
D="$(cd "$D" && pwd)"
cd "$D"  # the daemons' working directory
chmod 755 "$D"  # munged refuses directories others can write to

missing=0
for b in slurmctld slurmd sbatch srun scontrol munged mungekey; do
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
done
if [ "$missing" = 1 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "start_cluster.sh: Slurm is not installed and cannot be (needs root and apt-get: ${PACKAGES[*]})" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$D/apt.log" 2>&1; then
    apt-get update -q >>"$D/apt.log" 2>&1 || true
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$D/apt.log" 2>&1; then
      echo "start_cluster.sh: apt-get install ${PACKAGES[*]} failed; last lines of $D/apt.log:" >&2
      tail -5 "$D/apt.log" >&2
      exit 3
    fi
  fi
fi
export PATH="$PATH:/usr/sbin"
if [ "$(id -u)" != 0 ]; then
  echo "start_cluster.sh: the test cluster's daemons run as root (slurmd starts jobs for any user)" >&2
  exit 3
fi

rm -rf "$D/state" "$D/spool" "$D/run" "$D/log" "$D/munge"
mkdir -p "$D/state" "$D/run" "$D/log" "$D/jobs" "$D/munge"
for i in $(seq 1 "$N"); do mkdir -p "$D/spool/n$i"; done

# --- munge: own key, socket and daemon (run as the munge user, in the foreground so $! is its pid)
M="$D/munge"
chown munge:munge "$M" && chmod 755 "$M"  # the socket must be reachable by every user
mungekey --create --keyfile="$M/munge.key" >/dev/null 2>&1 \
  || dd if=/dev/urandom of="$M/munge.key" bs=1024 count=1 status=none
chown munge:munge "$M/munge.key" && chmod 400 "$M/munge.key"
touch "$D/log/munged.log" && chown munge:munge "$D/log/munged.log"
setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
  --socket="$M/munge.socket" --key-file="$M/munge.key" --pid-file="$M/munged.pid" \
  --seed-file="$M/munged.seed" --log-file="$D/log/munged.log" >"$D/log/munged.out" 2>&1 </dev/null &
echo $! >"$D/run/munged.pid"
for _ in $(seq 100); do
  munge -S "$M/munge.socket" -n 2>/dev/null | unmunge -S "$M/munge.socket" >/dev/null 2>&1 && break
  sleep 0.1
done
munge -S "$M/munge.socket" -n 2>/dev/null | unmunge -S "$M/munge.socket" >/dev/null 2>&1 \
  || { echo "start_cluster.sh: munged did not start:" >&2; cat "$D/log/munged.out" "$D/log/munged.log" >&2; exit 1; }

# --- ports: N+1 free TCP ports (the controller's, one per slurmd)
read -r -a PORTS <<<"$(python3 - "$N" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]) + 1)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"

HOST="$(hostname -s)"
MEM=$(awk -v n="$N" '/MemTotal/{print int($2 / 1024 * 0.5 / n)}' /proc/meminfo)
CPUS=$(nproc)
{
  cat <<CONF
ClusterName=harpetest
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=${PORTS[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# socket: this cluster's munged; cred_expire also sets the delay before a requeued job may start (+1 s)
AuthInfo=socket=$M/munge.socket,cred_expire=10
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.daemon.pid
SlurmdPidFile=$D/run/slurmd.%n.daemon.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=600
# a dead node (slurmd) is marked DOWN after SlurmdTimeout s without an answer; its jobs are requeued
SlurmdTimeout=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
${EXTRA_SLURM_CONF:-}
CONF
  for i in $(seq 1 "$N"); do
    echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${PORTS[$i]} CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE_TIME"
  echo "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
} >"$D/slurm.conf"
export SLURM_CONF="$D/slurm.conf"

# --- daemons: foreground mode (so the recorded pid is the daemon's), own session (survive the caller)
setsid /usr/sbin/slurmctld -D -i -f "$SLURM_CONF" >"$D/log/slurmctld.out" 2>&1 </dev/null &
echo $! >"$D/run/slurmctld.pid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
for i in $(seq 1 "$N"); do
  setsid /usr/sbin/slurmd -D -N "n$i" -f "$SLURM_CONF" >"$D/log/slurmd.n$i.out" 2>&1 </dev/null &
  echo $! >"$D/run/slurmd.n$i.pid"
done
for _ in $(seq 120); do
  if [ "$(sinfo -h -N -p debug -o %T 2>/dev/null | grep -c '^idle')" = "$N" ]; then
    echo "export SLURM_CONF=$SLURM_CONF" >"$D/env"
    exit 0
  fi
  sleep 0.5
done
echo "start_cluster.sh: the nodes are not idle after 60 s:" >&2
sinfo -N -l >&2 || true
tail -5 "$D/log/slurmctld.log" "$D"/log/slurmd.n*.log >&2 || true
exit 1
