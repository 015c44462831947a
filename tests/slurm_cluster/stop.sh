#!/usr/bin/env bash
# tests/slurm_cluster/stop.sh - stop exactly the daemons that start.sh (same folder) started.
# It reads the records start.sh wrote to $LOCAL_SLURM_DIR/run/<name>.pid
# ("pid starttime"); a daemon is signalled only if that pid is alive AND has the same
# start time (no pid-reuse accidents). Daemons it did not start are left alone.
# Running jobs are cancelled first so no slurmstepd/job processes are left behind.
# Safe to run when nothing is running. Exits non-zero if a daemon refuses to die.
set -uo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/mtdist-slurm}
RUN="$DIR/run"
rc=0

starttime() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }
running()   { kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }  # zombies count as gone
ours_pid()  {  # name -> pid if it is alive and is the process we started
  local r="$RUN/$1.pid" p st
  [ -s "$r" ] || return 1
  read -r p st < "$r"
  if [ -n "$p" ] && running "$p" && [ "$(starttime "$p")" = "$st" ]; then echo "$p"; return 0; fi
  rm -f "$r"; return 1          # stale record
}
stop() {       # name
  local name=$1 p i
  p=$(ours_pid "$name") || return 0
  kill -TERM "$p" 2>/dev/null
  for ((i = 0; i < 200; i++)); do running "$p" || break; sleep 0.1; done
  if running "$p"; then
    echo "[local-slurm] $name (pid $p) ignored SIGTERM for 20s, sending SIGKILL" >&2
    kill -KILL "$p" 2>/dev/null; sleep 0.5
  fi
  if running "$p"; then echo "[local-slurm] could not stop $name (pid $p)" >&2; rc=1; return; fi
  rm -f "$RUN/$name.pid"
  echo "[local-slurm] stopped $name (pid $p)"
}

[ -d "$RUN" ] || { echo "[local-slurm] nothing to stop ($RUN does not exist)"; exit 0; }
ls "$RUN"/*.pid >/dev/null 2>&1 || { echo "[local-slurm] nothing to stop (no daemons recorded in $RUN)"; exit 0; }

# cancel jobs first (only possible while our slurmctld runs); wait until they are gone
if ours_pid slurmctld >/dev/null && command -v squeue >/dev/null; then
  jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "[local-slurm] cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 60; i++)); do
      [ -z "$(timeout 10 squeue -h -o '%A' 2>/dev/null)" ] && break; sleep 0.5
    done
  fi
fi

for r in "$RUN"/slurmd-*.pid; do [ -e "$r" ] && stop "$(basename "$r" .pid)"; done
stop slurmctld
stop slurmdbd
stop mariadbd
stop munged
exit $rc
