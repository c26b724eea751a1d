#!/usr/bin/env bash
# slurm_local_stop.sh - stop the cluster started by slurm_local_start.sh.
# It cancels the cluster's jobs, then stops each daemon by the PID in its pid file,
# after checking that the PID still runs the expected program. It never kills by name.
#   SLURM_LOCAL_DIR   same base dir as the start script   [/tmp/slurm-local]
#   --purge           also delete $SLURM_LOCAL_DIR (logs included)
set -uo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
PURGE=0; [ "${1:-}" = "--purge" ] && PURGE=1
log() { echo "[slurm-local] $*" >&2; }
export SLURM_CONF=$DIR/etc/slurm.conf

# alive PID: running and not a zombie (PID 1 in this sandbox reaps orphans only after ~1-2 s)
alive() { local st; st=$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null); [ -n "$st" ] && [ "$st" != Z ]; }

# stop_pid NAME PIDFILE: TERM, wait up to 20 s, then KILL. Only if /proc/PID/comm == NAME.
stop_pid() {
  local name=$1 pf=$2 pid comm i
  [ -f "$pf" ] || return 0
  pid=$(cat "$pf" 2>/dev/null) || return 0
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || { rm -f "$pf"; return 0; }
  if [ "$comm" != "$name" ]; then log "pid $pid from $pf is '$comm', not $name; left alone"; return 0; fi
  local t0; t0=$(date +%s.%N)
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 400; i++)); do alive "$pid" || break; sleep 0.05; done
  if alive "$pid"; then log "$name ($pid) ignored SIGTERM; sending SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
  rm -f "$pf"
  log "stopped $name ($pid) in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
}

if [ -f "$SLURM_CONF" ] && [ -f "$DIR/run/slurmctld.pid" ]; then
  # Cancel the jobs, so that slurmd kills their slurmstepd/user processes
  # (slurmstepd keeps running if slurmd is simply stopped).
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel $jobs 2>/dev/null
    for ((i = 0; i < 150; i++)); do
      [ -z "$(timeout 5 squeue -h -t R,CG,S -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

for pf in "$DIR"/run/*.slurmd.pid; do [ -e "$pf" ] && stop_pid slurmd "$pf"; done
stop_pid slurmctld "$DIR/run/slurmctld.pid"
stop_pid slurmdbd  "$DIR/run/slurmdbd.pid"
stop_pid mariadbd  "$DIR/run/mysqld.pid"
stop_pid munged    "$DIR/run/munged.pid"

# Report (do not kill) a leftover job step daemon that still uses this cluster's spool dir.
for p in /proc/[0-9]*; do
  [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
  if ls -l "$p/fd" 2>/dev/null | grep -q "$DIR/"; then log "WARNING: slurmstepd ${p#/proc/} still running"; fi
done

[ "$PURGE" = 1 ] && rm -rf "$DIR" && log "removed $DIR"
exit 0
