#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for `sbatch slurm/ep_demo.sbatch` in tests and CI.
# Idempotent: does nothing when someone else's Slurm controller answers (a real cluster) or when our
# cluster already runs with the configuration below. Otherwise, as root: apt-get install slurm-wlm munge when absent, start munged (as user munge),
# write /etc/slurm/slurm.conf (this host only, all its CPUs, state under $SLURM_TMP), start slurmctld
# and slurmd, and wait until the node is idle. Exits non-zero with the reason when that is impossible.
# scripts/setup_slurm_nodes.sh runs a second, two-node cluster beside this one.
set -euo pipefail
unset SLURM_CONF  # this cluster's file is /etc/slurm/slurm.conf, not one a caller's environment points at
source "$(dirname "$0")/slurm_common.sh"
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
slurm_install setup_slurm
if [ -f "$CONF" ] && ! ours; then
    echo "setup_slurm: $CONF exists and is not ours, but no controller answers; start your Slurm" >&2
    exit 3
fi
slurm_munge

# The node is called localhost (slurmd -N): it always resolves, and tasks meet at the first host of
# the node list, whatever this machine's host name is.
host=localhost
cpus=$(slurm_cpus)
mkdir -p /etc/slurm "$SLURM_TMP/state" "$SLURM_TMP/spool"
old=$(cat "$CONF" 2>/dev/null || true)
{
    echo "$MARK"
    echo "ClusterName=eplocal"
    echo "SlurmctldHost=$host"
    slurm_conf_common "$SLURM_TMP"
    cat <<CONF
SlurmdSpoolDir=$SLURM_TMP/spool
SlurmdPidFile=$SLURM_TMP/slurmd.pid
SlurmdLogFile=$SLURM_TMP/slurmd.log
NodeName=$host NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
} > "$CONF"

if [ "$old" != "$(cat "$CONF")" ]; then  # daemons started with another configuration: restart them
    slurm_stop "$SLURM_TMP/slurmd.pid" "$SLURM_TMP/slurmctld.pid"
fi
slurm_running "$SLURM_TMP/slurmctld.pid" || slurmctld
slurm_running "$SLURM_TMP/slurmd.pid" || slurmd -N "$host"
if slurm_wait_nodes "$host"; then
    echo "setup_slurm: ok, node $host is up ($cpus CPUs)"
    exit 0
fi
echo "setup_slurm: the node did not come up; see $SLURM_TMP/slurmctld.log and slurmd.log" >&2
sinfo >&2 || true
exit 4
