#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for `sbatch slurm/ep_demo.sbatch` in tests and CI.
# Idempotent: does nothing when someone else's Slurm controller answers (a real cluster) or when our
# cluster already runs with the configuration below. Otherwise, as root: apt-get install slurm-wlm munge when absent, start munged (as user munge),
# write /etc/slurm/slurm.conf (this host only, all its CPUs, state under $SLURM_TMP), start slurmctld
# and slurmd, and wait until the node is idle. Exits non-zero with the reason when that is impossible.
set -euo pipefail
SLURM_TMP=${SLURM_TMP:-/tmp/ep-runtime-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by ep-runtime scripts/setup_slurm.sh"

node_ready() { sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

ours() { [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; }
if command -v sinfo >/dev/null && node_ready && ! ours; then
    echo "setup_slurm: a Slurm controller answers; nothing to do"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup_slurm: no Slurm answers and this is not root; cannot install or start one" >&2
    exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "setup_slurm: Slurm is absent and apt-get is not available" >&2; exit 2; }
    echo "setup_slurm: apt-get install slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
fi
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "setup_slurm: $CONF exists and is not ours, but no controller answers; start your Slurm" >&2
    exit 3
fi

# munge: the key comes with the package; create one if it did not.
if ! munge -n >/dev/null 2>&1; then  # no credential: munged is not running
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged --force
fi

# The node is called localhost (slurmd -N): it always resolves, and tasks meet at the first host of
# the node list, whatever this machine's host name is.
host=localhost
# All of the machine's CPUs (nproc --all: plain nproc obeys OMP_NUM_THREADS, which tests set to 1), and
# at least 2 so the 2-task demo runs on a 1-core machine too (config_overrides lets slurmd accept that).
cpus=$(nproc --all)
[ "$cpus" -ge 2 ] || cpus=2
mkdir -p /etc/slurm "$SLURM_TMP/state" "$SLURM_TMP/spool"
old=$(cat "$CONF" 2>/dev/null || true)
cat > "$CONF" <<CONF
$MARK
ClusterName=eplocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdParameters=config_overrides
StateSaveLocation=$SLURM_TMP/state
SlurmdSpoolDir=$SLURM_TMP/spool
SlurmctldPidFile=$SLURM_TMP/slurmctld.pid
SlurmdPidFile=$SLURM_TMP/slurmd.pid
SlurmctldLogFile=$SLURM_TMP/slurmctld.log
SlurmdLogFile=$SLURM_TMP/slurmd.log
NodeName=$host NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ "$old" != "$(cat "$CONF")" ]; then  # daemons started with another configuration: restart them
    for pid in "$SLURM_TMP/slurmd.pid" "$SLURM_TMP/slurmctld.pid"; do
        if running "$pid"; then kill "$(cat "$pid")"; fi
    done
    for _ in $(seq 30); do
        running "$SLURM_TMP/slurmd.pid" || running "$SLURM_TMP/slurmctld.pid" || break
        sleep 1
    done
fi
running "$SLURM_TMP/slurmctld.pid" || slurmctld
running "$SLURM_TMP/slurmd.pid" || slurmd -N "$host"
for _ in $(seq 60); do
    node_ready && { echo "setup_slurm: ok, node $host is up ($cpus CPUs)"; exit 0; }
    # A node that was down (e.g. after a restart) comes back on request.
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "setup_slurm: the node did not come up; see $SLURM_TMP/slurmctld.log and slurmd.log" >&2
sinfo >&2 || true
exit 4
