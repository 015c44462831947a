#!/usr/bin/env bash
# tests/slurm_cluster/start.sh - bring up a real (Debian Slurm 22.05) multi-node cluster on ONE machine,
# for mtdist's Slurm tests (tests/slurm_fixtures.py starts it once per pytest session and stops it).
# Adopted from the team's shared local-slurm script; changes for mtdist: no fake GPUs by default (our
# CI machines have none and the tests ask for tasks, not GPUs), its own work dir, and the restart on
# a configuration change calls this folder's stop.sh.
#
#   * N "nodes" (node1..nodeN) = N slurmd daemons on this host (Debian's slurmd is built
#     with --enable-multiple-slurmd), each with its own loopback address 127.0.0.(1+i)
#     and its own port; node names are added to /etc/hosts so MASTER_ADDR=node1 resolves.
#   * munged + slurmctld (+ slurmdbd/MariaDB for a working `sacct`, default on).
#   * no cgroups needed (proctrack/linuxproc, task/none).
#   * optional fake GPUs (GRES backed by /dev/null-like char devices) so that
#     `--gpus-per-node` is accepted and CUDA_VISIBLE_DEVICES is set.
#
# Idempotent: safe to run again while the cluster runs (it only checks it), or after
# stop.sh. Must run as root. Exits non-zero with a message on failure.
#
# Environment knobs (defaults in brackets):
#   LOCAL_SLURM_DIR         work dir for pid records, fake GPU devices, sacct shim [/tmp/mtdist-slurm]
#   LOCAL_SLURM_NODES       number of nodes [2]
#   LOCAL_SLURM_CPUS        CPUs declared per node (may exceed real cores) [4]
#   LOCAL_SLURM_MEM_MB      RealMemory per node in MB [75% of RAM / nodes]
#   LOCAL_SLURM_GPUS        fake GPUs per node (0 = no GRES) [0]
#   LOCAL_SLURM_ACCOUNTING  1 = slurmdbd + MariaDB (real sacct); 0 = none + sacct shim [1]
#   LOCAL_SLURM_TIMEOUT     seconds to wait for each daemon / for idle nodes [60]
set -Eeuo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/mtdist-slurm}
NODES=${LOCAL_SLURM_NODES:-2}
CPUS=${LOCAL_SLURM_CPUS:-4}
GPUS=${LOCAL_SLURM_GPUS:-0}
ACCT=${LOCAL_SLURM_ACCOUNTING:-1}
TMO=${LOCAL_SLURM_TIMEOUT:-60}
MEM=${LOCAL_SLURM_MEM_MB:-$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 3 / 4 / NODES ))}
RUN="$DIR/run"                       # pid records of daemons THIS script started
CONF=/etc/slurm
LOGD=/var/log/slurm
NODE_PORT_BASE=6830                  # nodeI listens on 6830+I ; ctld 6817 ; dbd 6819
T_START=$EPOCHREALTIME

log()  { printf '[local-slurm %6.1fs] %s\n' "$(awk "BEGIN {print $EPOCHREALTIME - $T_START}")" "$*"; }
die()  {
  echo "ERROR: $*" >&2
  command -v sinfo >/dev/null && timeout 5 sinfo -N -o '%N %t %E' >&2 2>/dev/null || true
  for f in $LOGD/slurmctld.log $LOGD/slurmdbd.log $LOGD/slurmd-node*.log "$DIR/mariadb.err" "$DIR"/*.out; do
    [ -s "$f" ] && { echo "---- tail $f" >&2; tail -n 12 "$f" >&2; }
  done
  exit 1
}
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

[ "$(id -u)" = 0 ] || die "must run as root"
[[ "$NODES" =~ ^[1-9][0-9]*$ && "$NODES" -le 50 ]] || die "LOCAL_SLURM_NODES must be 1..50"
mkdir -p "$DIR" "$RUN"

alive()        { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }  # zombie = dead
pid_of()       { [ -s "$1" ] && tr -dc '0-9' < "$1" || true; }     # pid from a daemon's pid file
starttime()    { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }
record()       { echo "$2 $(starttime "$2")" > "$RUN/$1.pid"; }    # name pid -> our record
ours_alive()   {                                                     # did WE start it and is it alive?
  local r="$RUN/$1.pid" p st
  [ -s "$r" ] || return 1
  read -r p st < "$r"
  alive "$p" && [ "$(starttime "$p")" = "$st" ]
}
# ---------------------------------------------------------------- 1. packages
PKGS=(munge slurmctld slurmd slurm-client)
[ "$ACCT" = 1 ] && PKGS+=(slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  tmp_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then      # keep postinst scripts from starting services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    tmp_policy=1
  fi
  ok=""
  for attempt in 1 2 3; do
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" \
        > "$DIR/apt-install.log" 2>&1; then ok=1; break; fi
    log "apt attempt $attempt failed; retrying"; sleep 5
  done
  [ -n "$tmp_policy" ] && rm -f /usr/sbin/policy-rc.d
  [ -n "$ok" ] || { tail -n 30 "$DIR/apt-install.log" >&2; die "apt-get install failed"; }
  log "packages installed"
fi
slurmd -V | grep -q '^slurm' || die "slurmd not usable"

# ---------------------------------------------------------------- 2. configuration
nodelines=""; gpuline=""
[ "$GPUS" -gt 0 ] && gpuline="GresTypes=gpu"
for ((i = 1; i <= NODES; i++)); do
  g=""; [ "$GPUS" -gt 0 ] && g=" Gres=gpu:$GPUS"
  nodelines+="NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.$((1 + i)) Port=$((NODE_PORT_BASE + i)) CPUs=$CPUS RealMemory=$MEM$g State=UNKNOWN"$'\n'
done
if [ "$ACCT" = 1 ]; then
  acct=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
else
  acct='AccountingStorageType=accounting_storage/none'
fi
new_conf=$(cat <<EOF
# generated by mtdist tests/slurm_cluster/start.sh -- $NODES node(s) on one host
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120s)
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$acct
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=3600
SlurmdParameters=config_overrides
$gpuline
${nodelines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
new_gres=""
if [ "$GPUS" -gt 0 ]; then
  mkdir -p "$DIR/fakegpu"
  for ((g = 0; g < GPUS; g++)); do
    [ -c "$DIR/fakegpu/nvidia$g" ] || { rm -f "$DIR/fakegpu/nvidia$g"; mknod "$DIR/fakegpu/nvidia$g" c 1 3; }  # like /dev/null
  done
  new_gres="NodeName=node[1-$NODES] Name=gpu File=$DIR/fakegpu/nvidia[0-$((GPUS - 1))]"
  [ "$GPUS" = 1 ] && new_gres="NodeName=node[1-$NODES] Name=gpu File=$DIR/fakegpu/nvidia0"
fi

changed=""
[ "$(cat $CONF/slurm.conf 2>/dev/null || true)" = "$new_conf" ] || changed=1
[ "$(cat $CONF/gres.conf 2>/dev/null || true)" = "$new_gres" ] || changed=1
if [ -n "$changed" ]; then
  if alive "$(pid_of /run/slurmctld.pid)" && ! ours_alive slurmctld; then
    die "slurmctld is running (not started by this script) with a different configuration"
  fi
  for r in "$RUN"/slurmctld.pid "$RUN"/slurmd-*.pid; do
    if [ -e "$r" ] && ours_alive "$(basename "$r" .pid)"; then
      log "configuration changed: restarting the daemons this script started"
      "$(dirname "$(readlink -f "$0")")/stop.sh" || die "could not stop running cluster"
      break
    fi
  done
  mkdir -p $CONF
  printf '%s\n' "$new_conf" > $CONF/slurm.conf
  if [ -n "$new_gres" ]; then printf '%s\n' "$new_gres" > $CONF/gres.conf; else rm -f $CONF/gres.conf; fi
  log "wrote $CONF/slurm.conf"
fi
if [ "$ACCT" = 1 ]; then
  cat > $CONF/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=$LOGD/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 $CONF/slurmdbd.conf
else   # submitit polls `sacct`; without accounting it fails and cancelled/killed jobs hang job.result()
  mkdir -p "$DIR/bin"
  cat > "$DIR/bin/sacct" <<'EOF'
#!/bin/bash
# sacct stand-in (no accounting storage): answers `sacct -o JobID,State,NodeList --parsable2 -j ID...`
# from slurmctld's memory (jobs are kept MinJobAge=3600s after they end).
ids=()
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids+=(${2//,/ }); shift 2 ;;
    -j*) ids+=(${1#-j}); shift ;;
    --jobs=*) v=${1#--jobs=}; ids+=(${v//,/ }); shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for id in "${ids[@]}"; do squeue -h --states=all -j "$id" -o '%i|%T|%N' 2>/dev/null; done
exit 0
EOF
  chmod +x "$DIR/bin/sacct"
fi

# node names must resolve (submitit's TorchDistributedEnvironment uses MASTER_ADDR=node1)
for ((i = 1; i <= NODES; i++)); do
  getent hosts "node$i" | grep -q "^127\.0\.0\.$((1 + i))\b" && continue
  grep -v "[[:space:]]node$i # local-slurm$" /etc/hosts > "$DIR/hosts.tmp" || true
  echo "127.0.0.$((1 + i)) node$i # local-slurm" >> "$DIR/hosts.tmp"
  cat "$DIR/hosts.tmp" > /etc/hosts; rm -f "$DIR/hosts.tmp"
done
mkdir -p /var/spool/slurmctld /var/spool/slurmd $LOGD

# ---------------------------------------------------------------- 3. daemons
# Every daemon runs in the foreground (-D/-F) in its own session, detached from this
# script's stdin/stdout/stderr (otherwise `start_local_slurm.sh | tee log` would never end),
# so its pid is known at once ($!; setsid does not fork here) and a crash is noticed at once.
launch() {     # name cmd...   -> sets $LPID
  local name=$1; shift
  setsid "$@" </dev/null >>"$DIR/$name.out" 2>&1 &
  LPID=$!
  record "$name" "$LPID"
}
wait_up() {    # desc pid cmd...   wait until cmd succeeds; fail fast if pid died
  local desc=$1 p=$2; shift 2; local i
  for ((i = 0; i < TMO * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    alive "$p" || die "$desc exited during startup (see its log and $DIR/*.out)"
    sleep 0.25
  done
  die "timed out after ${TMO}s waiting for $desc"
}

# munge
if ! alive "$(pid_of /run/munge/munged.pid)"; then
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge /etc/munge/munge.key; chmod 700 /etc/munge; chmod 600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F --force --num-threads=4
  wait_up "munged" "$LPID" bash -c 'munge -n | unmunge'
  log "munged started (pid $LPID)"
fi

if [ "$ACCT" = 1 ]; then
  # MariaDB (unix socket only, no TCP); slurmdbd logs in as root through the socket
  if ! alive "$(pid_of /run/mysqld/mysqld.pid)"; then
    if [ ! -d /var/lib/mysql/mysql ]; then
      mariadb-install-db --user=mysql --datadir=/var/lib/mysql > "$DIR/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed (see $DIR/mariadb-install.log)"
    fi
    install -d -o mysql -g mysql /run/mysqld
    launch mariadbd /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid --log-error="$DIR/mariadb.err" --innodb-buffer-pool-size=64M
    wait_up "mariadbd" "$LPID" mysqladmin --socket=/run/mysqld/mysqld.sock ping
    log "mariadbd started (pid $LPID)"
  fi
  if ! alive "$(pid_of /run/slurmdbd.pid)"; then
    launch slurmdbd slurmdbd -D
    wait_up "slurmdbd" "$LPID" sacctmgr -n -P list cluster
    log "slurmdbd started (pid $LPID)"
  fi
fi

if ! alive "$(pid_of /run/slurmctld.pid)"; then
  launch slurmctld slurmctld -D
  wait_up "slurmctld" "$LPID" bash -c 'scontrol ping | grep -q UP'
  log "slurmctld started (pid $LPID)"
fi

for ((i = 1; i <= NODES; i++)); do
  n=node$i
  if ! alive "$(pid_of /run/slurmd-$n.pid)"; then
    launch "slurmd-$n" slurmd -D -N "$n"
    wait_up "slurmd $n" "$LPID" test -s "/run/slurmd-$n.pid"
    log "slurmd $n started (pid $LPID)"
  fi
done

# ---------------------------------------------------------------- 4. wait for usable nodes
# idle, or running jobs of another test session sharing this cluster (mix/alloc/completing)
all_idle() {
  local s
  s=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
  [ "$(echo "$s" | awk '$2 ~ /^(idle|mix|alloc|comp)$/ {c++} END {print c + 0}')" -eq "$NODES" ] && return 0
  # nodes left DRAIN/DOWN by an earlier run (state is kept in /var/spool/slurmctld) are resumed
  echo "$s" | awk '$2 ~ /^(drain|drng|down|fail)$/ {print $1}' |
    while read -r n; do scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true; done
  return 1
}
for ((t = 0; ; t++)); do
  all_idle && break
  for ((i = 1; i <= NODES; i++)); do
    alive "$(pid_of /run/slurmd-node$i.pid)" || die "slurmd node$i died (see $LOGD/slurmd-node$i.log)"
  done
  [ "$t" -lt $((TMO * 4)) ] || die "timed out after ${TMO}s waiting for $NODES usable node(s)"
  sleep 0.25
done
log "cluster ready: $(sinfo -h -o '%P %a %D %t %N' | tr '\n' ' ')"
[ "$ACCT" = 1 ] || log "no accounting: put the sacct shim first in PATH:  export PATH=$DIR/bin:\$PATH"
exit 0
