#!/usr/bin/env bash
# A real two-node Slurm on this one host, to run the sbatch scripts of this folder (the tests do):
# munged, slurmctld and one slurmd per node ("n1", "n2", both at 127.0.0.1 on their own ports),
# every file they use (config, munge key, sockets, state, spool, logs, pid files) under one folder.
#
#   slurm/local-cluster.sh start     # as root; installs Debian's slurmctld slurmd slurm-client munge when missing
#   export SLURM_CONF=/tmp/lowrank-slurm/slurm.conf   # then sbatch, squeue, scontrol, ... talk to it
#   slurm/local-cluster.sh status
#   slurm/local-cluster.sh stop      # cancels its jobs, then ends only the daemons it started
#
# LOCAL_CLUSTER_DIR (default /tmp/lowrank-slurm) holds it all; LOCAL_CLUSTER_PORT (default 16817)
# is slurmctld's port, the nodes' slurmd take the next two. A system Slurm or munge is left alone.
set -euo pipefail

DIR=${LOCAL_CLUSTER_DIR:-/tmp/lowrank-slurm}
PORT=${LOCAL_CLUSTER_PORT:-16817}
NODES=(n1 n2)
PACKAGES=(slurmctld slurmd slurm-client munge)
export SLURM_CONF="$DIR/slurm.conf"

install_packages() {
    local missing
    missing=$(for command in slurmctld slurmd sbatch munged mungekey; do command -v "$command" >/dev/null || echo "$command"; done)
    [[ -z $missing ]] && return
    if ! command -v apt-get >/dev/null; then
        echo "local-cluster: no apt-get to install ${PACKAGES[*]} (missing: ${missing//$'\n'/ })" >&2
        exit 2
    fi
    echo "local-cluster: installing ${PACKAGES[*]}"
    apt-get update -qq
    # Services the packages may start use the system's files; the daemons below use only $DIR.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

write_config() {
    mkdir -p "$DIR"/{munge,state,log} "${NODES[@]/#/$DIR/spool/}"
    chmod 700 "$DIR/munge"
    [[ -f $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
    local node_port=$((PORT + 1))
    cat >"$SLURM_CONF" <<EOF
# Written by slurm/local-cluster.sh: two nodes on one host, everything under $DIR.
ClusterName=lowrank
# One fake GPU per node (gres.conf): jobs asking for GPUs, like slurm/resnet50_gpu.sbatch, get
# scheduled as on a GPU cluster and run on the CPU.
GresTypes=gpu
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=20
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# No cgroups in containers and CI machines: processes tracked by parent, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# The nodes' CPUs are declared, not probed: both share this host's cores.
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to scontrol show job for an hour (there is no accounting database).
MinJobAge=3600
# Pending jobs (a requeued one, once its wait is over) start within seconds, not a minute.
SchedulerParameters=sched_interval=5,bf_interval=5
NodeName=${NODES[0]} NodeAddr=127.0.0.1 Port=$node_port CPUs=2 RealMemory=1000 Gres=gpu:1 State=UNKNOWN
NodeName=${NODES[1]} NodeAddr=127.0.0.1 Port=$((node_port + 1)) CPUs=2 RealMemory=1000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=${NODES[0]},${NODES[1]} Default=YES MaxTime=INFINITE State=UP
EOF
    # Slurm counts a GPU by its device file; any character device will do for a fake one.
    echo "Name=gpu File=/dev/null" >"$DIR/gres.conf"
}

# The daemons this script starts, in starting order: command name and pid file.
daemons() {
    echo "munged $DIR/munge/munged.pid"
    echo "slurmctld $DIR/slurmctld.pid"
    for node in "${NODES[@]}"; do
        echo "slurmd $DIR/slurmd-$node.pid"
    done
}

# The pid in a pid file, if that process still runs and is the daemon named (not a reused pid).
running_pid() {
    local pid
    pid=$(cat "$2" 2>/dev/null) || return 1
    [[ $(ps -o comm= -p "$pid") == "$1" ]] && echo "$pid"
}

start() {
    # The daemons run jobs as any user, and munged and slurmd need root for that.
    if [[ $EUID -ne 0 ]]; then
        echo "local-cluster: needs root" >&2
        exit 2
    fi
    install_packages
    if status >/dev/null; then
        echo "local-cluster: already running; export SLURM_CONF=$SLURM_CONF"
        return
    elif [[ $(status) == *": running"* ]]; then
        echo "local-cluster: partly running in $DIR: run '$0 stop' first" >&2
        exit 1
    fi
    write_config
    # --force: munged wants every folder above its socket open to all users; only root uses this one.
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    slurmctld -c # a fresh cluster: no jobs or nodes states from an earlier one
    for node in "${NODES[@]}"; do
        slurmd -N "$node"
    done
    # Both nodes idle: ready for jobs.
    for _ in $(seq 120); do
        if [[ $(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) -eq ${#NODES[@]} ]]; then
            echo "local-cluster: ${NODES[*]} idle; export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.5
    done
    echo "local-cluster: nodes not idle after 60 s; logs in $DIR/log" >&2
    sinfo -N >&2 || true
    exit 1
}

stop() {
    if running_pid slurmctld "$DIR/slurmctld.pid" >/dev/null; then
        # This cluster's jobs only (SLURM_CONF points at it); their steps end before the daemons go.
        scancel --quiet --partition=debug || true
        for _ in $(seq 60); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    local name pidfile pid failed=0
    while read -r name pidfile; do
        pid=$(running_pid "$name" "$pidfile") || continue
        kill "$pid"
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "local-cluster: $name (pid $pid) did not stop" >&2
            failed=1
        fi
    done < <(daemons | tac)
    [[ $failed -eq 0 ]] && echo "local-cluster: stopped"
    return $failed
}

status() {
    local name pidfile pid down=0
    while read -r name pidfile; do
        if pid=$(running_pid "$name" "$pidfile"); then
            echo "$(basename "$pidfile" .pid): running (pid $pid)"
        else
            echo "$(basename "$pidfile" .pid): not running"
            down=1
        fi
    done < <(daemons)
    [[ $down -eq 0 ]] && echo "SLURM_CONF=$SLURM_CONF" && sinfo -N
    return $down
}

case ${1:-} in
start | stop | status) "$1" ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
