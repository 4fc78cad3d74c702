# Shared by scripts/setup_slurm.sh (a one-node cluster) and scripts/setup_slurm_nodes.sh (two nodes in
# network namespaces): install, munge, the slurm.conf settings both use, daemon restarts and the wait
# for nodes. Sourced, not run; `set -euo pipefail` is the caller's. Functions that cannot do their job
# exit with the scripts' codes: 2 = not possible here (the tests skip), other = failure.

# Debian's slurm-wlm and munge, when absent. $1 names the caller in messages.
slurm_install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    command -v apt-get >/dev/null || { echo "$1: Slurm is absent and apt-get is not available" >&2; exit 2; }
    echo "$1: apt-get install slurm-wlm munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
}

# munged running as user munge; the key comes with the package, created here if it did not.
slurm_munge() {
    munge -n >/dev/null 2>&1 && return  # a credential: munged runs
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged --force
}

# All of the machine's CPUs (nproc --all: plain nproc obeys OMP_NUM_THREADS, which tests set to 1), and
# at least 2 so a 2-task job runs on a 1-core machine too (SlurmdParameters=config_overrides lets
# slurmd accept more than it has).
slurm_cpus() {
    local cpus
    cpus=$(nproc --all)
    [ "$cpus" -ge 2 ] && echo "$cpus" || echo 2
}

# The settings both clusters share, printed for a slurm.conf: root runs everything, no cgroups, no
# accounting, state and logs under $1; a node that was down returns when its slurmd registers.
# MinJobAge=5: `sbatch --wait` polls the job after 2, 8 and 32 s, but stops lengthening the interval
# at MinJobAge/2 (a finished job must still be known when it asks); with 5 it polls every 2 s, where
# the default (300) returned a 12 s job after 42 s.
slurm_conf_common() {
    cat <<CONF
MinJobAge=5
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
StateSaveLocation=$1/state
SlurmctldPidFile=$1/slurmctld.pid
SlurmctldLogFile=$1/slurmctld.log
CONF
}

# A pid file ($1) names a live Slurm daemon: the pid runs and is a slurmd or slurmctld (a stale file
# left across a reboot may name any process by now; it is never signalled).
slurm_running() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    kill -0 "$pid" 2>/dev/null && grep -qxE 'slurmd|slurmctld' "/proc/$pid/comm" 2>/dev/null
}

# Stop the daemons of the pid files given ($@) and wait (30 s at most) until they are gone.
slurm_stop() {
    local pid
    for pid in "$@"; do
        if slurm_running "$pid"; then kill "$(cat "$pid")"; fi
    done
    for _ in $(seq 30); do
        for pid in "$@"; do
            slurm_running "$pid" && { sleep 1; continue 2; }
        done
        return 0
    done
    return 0  # the caller's start then fails, saying why
}

# Wait (60 s at most) until every node named in $@ is up, resuming nodes that a restart left down.
# The controller is the one of $SLURM_CONF (or /etc/slurm/slurm.conf).
slurm_wait_nodes() {
    local node states
    for _ in $(seq 60); do
        states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
        for node in "$@"; do
            if ! grep -qE "^$node (idle|mixed|allocated|completing)" <<<"$states"; then
                scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                sleep 1
                continue 2
            fi
        done
        return 0
    done
    return 1
}
