#!/usr/bin/env bash
# Two Slurm "hosts" on this machine, for multi-node jobs in tests and CI:
#
#   scripts/setup_slurm_nodes.sh          # start (idempotent); the last line says SLURM_CONF=...
#   SLURM_CONF=/tmp/ep-runtime-slurm-nodes/slurm.conf sbatch --nodes=2 slurm/ep_multinode.sbatch
#   scripts/setup_slurm_nodes.sh down     # stop the daemons, remove namespaces, bridge and files
#
# Nodes ep-node1 and ep-node2 are network namespaces of the same names, each with its own address
# ($NET.11, $NET.12) on a veth pair whose other end sits on the bridge $BRIDGE in the root namespace,
# which has $NET.1: the only route either namespace has, so traffic goes between the two nodes and
# the controller and nowhere else. Each slurmd (and so each job step on that node) runs in its
# network namespace, in a UTS namespace with the node's name as host name and in a mount namespace
# where /etc/netns/<node>/hosts is bound over /etc/hosts: it maps both names to their addresses, so
# the first host of a node list (the rendezvous of srun and torchrun jobs) and each node's own name
# (gloo binds to the address its host name resolves to) give addresses that both nodes reach.
# (Not `ip netns exec`: it mounts a fresh /sys, without the /sys/fs/cgroup that slurmd requires.)
#
# It is a cluster of its own beside scripts/setup_slurm.sh's one-node cluster (which keeps
# /etc/slurm/slurm.conf): its slurm.conf, state and logs live in $SLURM_NODES_TMP, its slurmctld runs
# in the root namespace on port $CTLD_PORT, and clients reach it through SLURM_CONF. Needs root and
# `ip netns`; exits 2 with the reason where they are missing (the tests skip), other non-zero on failure.
set -euo pipefail
source "$(dirname "$0")/slurm_common.sh"
SLURM_NODES_TMP=${SLURM_NODES_TMP:-/tmp/ep-runtime-slurm-nodes}
NET=${SLURM_NODES_NET:-10.213.0}  # a /24 that nothing else on this machine uses
BRIDGE=epslurm0
CTLD_PORT=6827  # the one-node cluster's slurmctld keeps the default 6817
NODES=(ep-node1 ep-node2)
CONF=$SLURM_NODES_TMP/slurm.conf
export SLURM_CONF=$CONF
NAME=setup_slurm_nodes

node_addr() { echo "$NET.$((10 + $1))"; }  # node index 1, 2 -> $NET.11, $NET.12

if [ "$(id -u)" != 0 ]; then
    echo "$NAME: network namespaces and Slurm daemons need root; this is uid $(id -u)" >&2
    exit 2
fi
command -v ip >/dev/null && ip netns list >/dev/null 2>&1 \
    || { echo "$NAME: 'ip netns' is not available (install iproute2)" >&2; exit 2; }
command -v unshare >/dev/null && command -v nsenter >/dev/null \
    || { echo "$NAME: unshare and nsenter (util-linux) are not available" >&2; exit 2; }

MARK=.ep-runtime-slurm-nodes  # in $SLURM_NODES_TMP: this script made the directory, so down may delete it

down() {
    local ns pids
    if [ -d "$SLURM_NODES_TMP" ] && [ ! -e "$SLURM_NODES_TMP/$MARK" ]; then
        echo "$NAME: $SLURM_NODES_TMP was not made by this script (no $MARK in it); leaving it and its daemons alone" >&2
        exit 3
    fi
    slurm_stop "$SLURM_NODES_TMP"/slurmd.*.pid "$SLURM_NODES_TMP/slurmctld.pid"
    for ns in "${NODES[@]}"; do
        if [ -e "/run/netns/$ns" ]; then
            # Whatever still runs there (a job's tasks) was started by this cluster.
            pids=$(ip netns pids "$ns")
            if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null || true; fi
            ip netns del "$ns"  # removes its end of the veth pair, and so the pair
        fi
        rm -rf "/etc/netns/$ns"
    done
    rmdir /etc/netns 2>/dev/null || true  # when nothing else lives there
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link del "$BRIDGE"; fi
    rm -rf "$SLURM_NODES_TMP"
}

case "${1:-up}" in
    up | down) ;;
    *) echo "$NAME: unknown action '$1'; allowed: up (default), down" >&2; exit 3 ;;
esac
if [ "${1:-up}" = up ]; then
    slurm_install "$NAME"
    slurm_munge
fi
# Setup and teardown of concurrent callers do not interleave. Daemons started below get `9>&-`: one
# that inherited the lock's descriptor would hold the lock for its lifetime.
exec 9>"/tmp/ep-runtime-slurm-nodes.lock"
flock -w 120 9 || { echo "$NAME: another setup_slurm_nodes.sh holds the lock for 120 s" >&2; exit 3; }
if [ "${1:-up}" = down ]; then
    down
    echo "$NAME: removed"
    exit 0
fi

# ---------------------------------------------------------------- network
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    if ip -o -4 addr show | grep -qF " $NET."; then
        echo "$NAME: $NET.0/24 is in use on this machine; set SLURM_NODES_NET to a free /24 prefix" >&2
        exit 3
    fi
    err=$(ip link add "$BRIDGE" type bridge 2>&1) \
        || { echo "$NAME: cannot create a bridge: $err" >&2; exit 2; }
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
fi
for i in 1 2; do
    ns=${NODES[i - 1]}
    if [ ! -e "/run/netns/$ns" ]; then
        err=$(ip netns add "$ns" 2>&1) || { echo "$NAME: cannot create network namespace $ns: $err" >&2; exit 2; }
        ip link add "epslurm-n$i" type veth peer name eth0 netns "$ns"
        ip link set "epslurm-n$i" master "$BRIDGE" up
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    fi
    mkdir -p "/etc/netns/$ns"
    {
        echo "127.0.0.1 localhost"
        for j in 1 2; do echo "$(node_addr "$j") ${NODES[j - 1]}"; done
    } > "/etc/netns/$ns/hosts"
done

# ---------------------------------------------------------------- cluster
# SlurmctldHost=localhost: slurmctld takes it for this machine's short host name, whatever that is;
# everyone (root namespace and nodes) reaches it at the bridge address.
cpus=$(slurm_cpus)
if [ -d "$SLURM_NODES_TMP" ] && [ ! -e "$SLURM_NODES_TMP/$MARK" ]; then
    echo "$NAME: $SLURM_NODES_TMP exists and was not made by this script; set SLURM_NODES_TMP to a new directory" >&2
    exit 3
fi
mkdir -p "$SLURM_NODES_TMP/state"
touch "$SLURM_NODES_TMP/$MARK"
old=$(cat "$CONF" 2>/dev/null || true)
{
    echo "# written by ep-runtime scripts/setup_slurm_nodes.sh"
    echo "ClusterName=epnodes"
    echo "SlurmctldHost=localhost($NET.1)"
    echo "SlurmctldPort=$CTLD_PORT"
    slurm_conf_common "$SLURM_NODES_TMP"
    # %n: each node's slurmd has its own spool, pid and log file.
    cat <<CONF
SlurmdSpoolDir=$SLURM_NODES_TMP/spool.%n
SlurmdPidFile=$SLURM_NODES_TMP/slurmd.%n.pid
SlurmdLogFile=$SLURM_NODES_TMP/slurmd.%n.log
CONF
    for i in 1 2; do
        echo "NodeName=${NODES[i - 1]} NodeAddr=$(node_addr "$i") CPUs=$cpus State=UNKNOWN"
    done
    echo "PartitionName=nodes Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
} > "$CONF"

pidfiles=("$SLURM_NODES_TMP/slurmctld.pid")
for ns in "${NODES[@]}"; do pidfiles+=("$SLURM_NODES_TMP/slurmd.$ns.pid"); done
if [ "$old" != "$(cat "$CONF")" ]; then  # daemons started with another configuration: restart them
    slurm_stop "${pidfiles[@]}"
fi
slurm_running "$SLURM_NODES_TMP/slurmctld.pid" || slurmctld -f "$CONF" 9>&-
for ns in "${NODES[@]}"; do
    mkdir -p "$SLURM_NODES_TMP/spool.$ns"
    slurm_running "$SLURM_NODES_TMP/slurmd.$ns.pid" \
        || nsenter --net="/run/netns/$ns" unshare --uts --mount sh -c \
            'hostname "$1" && mount --bind "/etc/netns/$1/hosts" /etc/hosts && exec slurmd -f "$2" -N "$1"' \
            _ "$ns" "$CONF" 9>&-
done
if slurm_wait_nodes "${NODES[@]}"; then
    echo "$NAME: ok, nodes ${NODES[*]} are up ($cpus CPUs each) at $(node_addr 1) and $(node_addr 2)"
    echo "SLURM_CONF=$CONF"
    exit 0
fi
echo "$NAME: the nodes did not come up; see the logs in $SLURM_NODES_TMP; '$0 down' starts afresh" >&2
sinfo -N >&2 || true
exit 4
