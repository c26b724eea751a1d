#!/usr/bin/env bash
# slurm_local_start.sh - bring up a throwaway, single-machine Slurm cluster
# (slurmctld + slurmd [+ munged] [+ mariadbd + slurmdbd]) on 127.0.0.1, for ldmscale's Slurm tests
# (tests/slurm/conftest.py). Packages: .ci/install-slurm.sh.
#
# Tested with Debian 12 (bookworm) Slurm 22.05.8 packages, as root, with no
# systemd (the daemons are started by hand). Non-interactive. Waits until
# every node shows "idle" in sinfo (and until sacct works when accounting is
# on), then prints the line `export SLURM_CONF=...`. Clients (sbatch, squeue,
# sacct, scancel, and so submitit) need that variable, because nothing is
# written to /etc/slurm.
#
# Every file goes under $SLURM_LOCAL_DIR. That directory is WIPED at each start.
# Stop with slurm_local_stop.sh (same environment variables).
#
# Settings (environment variables):
#   SLURM_LOCAL_DIR          base dir, wiped at start        [/tmp/slurm-local]
#   SLURM_LOCAL_NODES        number of slurmd "virtual nodes" [1]
#   SLURM_LOCAL_NODE_NAMES   space-separated node names (overrides the default names)
#   SLURM_LOCAL_CPUS         CPUs declared per node          [nproc]
#                            (it may be larger than the real CPU count: config_overrides is on)
#   SLURM_LOCAL_MEM_MB       RealMemory per node, in MB       [(MemTotal - 1 GiB) / nodes]
#   SLURM_LOCAL_PARTITION    partition name (the default one) [debug]
#   SLURM_LOCAL_AUTH         munge | none                     [munge]
#   SLURM_LOCAL_ACCOUNTING   1: mariadbd + slurmdbd, so sacct works (submitit needs it)
#                            0: no accounting (sacct fails)   [1]
#   SLURM_LOCAL_INSTALL      1: apt-get install missing packages [1]
#   SLURM_LOCAL_PORT_BASE    slurmctld=BASE, slurmd=BASE+1 (1 node) or BASE+10+i,
#                            slurmdbd=BASE+2                  [6817]
#   SLURM_LOCAL_DB_PORT      mariadbd TCP port (127.0.0.1)    [BASE+490 = 7307]
#   SLURM_LOCAL_CRED_EXPIRE  AuthInfo cred_expire in seconds. This is also how long a
#                            requeued job waits before it can run again
#                            (the Slurm default is 120)       [10]
#   SLURM_LOCAL_FIRST_JOB_ID first job id. The default is time based, so job ids do not
#                            start again at 1 after each restart, and a submitit folder
#                            ".../%j" from an earlier run is never reused (a stale
#                            <id>_0_result.pkl would be returned as the result)
#                                                             [(epoch % 60000) * 1000 + 1]
#   SLURM_LOCAL_EDIT_HOSTS   1: add the node names that do not resolve to /etc/hosts
#                            as 127.0.0.1                     [0]
#   SLURM_LOCAL_TIMEOUT      seconds to wait for readiness    [60]
#   SLURM_LOCAL_CTLD_DEBUG   SlurmctldDebug level; debug2 logs each time-limit check
#                            ("Testing job time limits"), which the time-limit test times its job by [info]
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
NODES=${SLURM_LOCAL_NODES:-1}
AUTH=${SLURM_LOCAL_AUTH:-munge}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
INSTALL=${SLURM_LOCAL_INSTALL:-1}
PORT_BASE=${SLURM_LOCAL_PORT_BASE:-6817}
DB_PORT=${SLURM_LOCAL_DB_PORT:-$((PORT_BASE + 490))}
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
EDIT_HOSTS=${SLURM_LOCAL_EDIT_HOSTS:-0}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
CTLD_DEBUG=${SLURM_LOCAL_CTLD_DEBUG:-info}
FIRST_JOB_ID=${SLURM_LOCAL_FIRST_JOB_ID:-$(( ($(date +%s) % 60000) * 1000 + 1 ))}   # <= 60000001 < MaxJobId 67043328

CTLD_PORT=$PORT_BASE
DBD_PORT=$((PORT_BASE + 2))

log() { echo "[slurm-local] $*" >&2; }
die() { echo "[slurm-local] ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
port_in_use() { (: </dev/tcp/127.0.0.1/"$1") 2>/dev/null; }
# wait_for DESCRIPTION COMMAND... : poll until COMMAND succeeds or TIMEOUT expires
wait_for() {
  local what=$1; shift
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "timed out waiting for: $what"
      for f in "$DIR"/log/*.log; do [ -f "$f" ] && { echo "---- $f (last 15 lines)" >&2; tail -15 "$f" >&2; }; done
      die "cluster did not come up"
    fi
    sleep 0.1
  done
}

[ "$(id -u)" = 0 ] || die "must run as root (SlurmUser=root, daemons started by hand)"
case "$AUTH" in munge|none) ;; *) die "SLURM_LOCAL_AUTH must be munge or none" ;; esac
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_NODES must be a positive integer"

T_ALL=$(now)

# ---------------------------------------------------------------- packages
need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd    >/dev/null || need+=(slurmd)
command -v sbatch    >/dev/null || need+=(slurm-client)
command -v munged    >/dev/null || need+=(munge)
if [ "$ACCOUNTING" = 1 ]; then
  command -v slurmdbd >/dev/null || need+=(slurmdbd)
  command -v mariadbd >/dev/null || need+=(mariadb-server-core)
fi
if [ ${#need[@]} -gt 0 ]; then
  [ "$INSTALL" = 1 ] || die "missing packages: ${need[*]} (set SLURM_LOCAL_INSTALL=1)"
  T=$(now)
  log "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  # --no-install-recommends: 8 pkgs / ~13 MB (+8 pkgs / ~48 MB for accounting)
  # instead of 43+ pkgs with slurm-wlm.
  apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${need[@]}" >/dev/null
  log "apt install took $(elapsed "$T")s"
fi

# ---------------------------------------------------------------- sanity
for f in slurmd.pid slurmctld.pid slurmdbd.pid mysqld.pid munged.pid; do
  for pf in "$DIR"/run/*"$f"; do
    [ -f "$pf" ] || continue
    p=$(cat "$pf" 2>/dev/null || true)
    st=$(awk '/^State:/{print $2}' "/proc/$p/status" 2>/dev/null || true)
    if [ -n "$p" ] && [ -n "$st" ] && [ "$st" != Z ]; then
      die "a cluster seems to be running already in $DIR (pid $p from $pf); run slurm_local_stop.sh first"
    fi
  done
done

H=$(hostname -s)
if [ -n "${SLURM_LOCAL_NODE_NAMES:-}" ]; then
  read -r -a NAMES <<<"$SLURM_LOCAL_NODE_NAMES"
  [ ${#NAMES[@]} -eq "$NODES" ] || die "SLURM_LOCAL_NODE_NAMES has ${#NAMES[@]} names but SLURM_LOCAL_NODES=$NODES"
else
  # Node names are what submitit reports as hostnames (so they become MASTER_ADDR).
  # Use names that already resolve (the real hostname, then localhost), so no /etc/hosts edit is needed.
  NAMES=("$H")
  [ "$NODES" -ge 2 ] && NAMES+=("localhost")
  for ((i = 3; i <= NODES; i++)); do NAMES+=("${H}-vn$i"); done
fi
for n in "${NAMES[@]}"; do
  if ! getent hosts "$n" >/dev/null; then
    if [ "$EDIT_HOSTS" = 1 ]; then
      echo "127.0.0.1 $n  # added by slurm_local_start.sh" >>/etc/hosts
      log "added '$n' to /etc/hosts"
    else
      log "WARNING: node name '$n' does not resolve; a job whose first node is '$n' gets an" \
          "unresolvable MASTER_ADDR (set SLURM_LOCAL_EDIT_HOSTS=1)"
    fi
  fi
done

NCPU=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM_TOTAL_MB=$(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo)
MEM=${SLURM_LOCAL_MEM_MB:-$(( (MEM_TOTAL_MB - 1024) / NODES ))}

ports=("$CTLD_PORT")
if [ "$NODES" -eq 1 ]; then SLURMD_PORTS=($((PORT_BASE + 1))); else
  SLURMD_PORTS=(); for ((i = 0; i < NODES; i++)); do SLURMD_PORTS+=($((PORT_BASE + 10 + i))); done; fi
ports+=("${SLURMD_PORTS[@]}")
[ "$ACCOUNTING" = 1 ] && ports+=("$DBD_PORT" "$DB_PORT")
for p in "${ports[@]}"; do port_in_use "$p" && die "port $p on 127.0.0.1 is in use (another cluster? set SLURM_LOCAL_PORT_BASE)"; done

# ---------------------------------------------------------------- files
rm -rf "$DIR"
mkdir -p "$DIR"/{etc,log,run,state,spool}
chmod 755 "$DIR" "$DIR"/*
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF

if [ "$AUTH" = munge ]; then
  mkdir -p "$DIR/munge"; chmod 755 "$DIR/munge"      # the socket dir must be o+x for munged
  mungekey -c -k "$DIR/munge/munge.key" >/dev/null 2>&1 \
    || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none; }
  chmod 600 "$DIR/munge/munge.key"
  AUTH_LINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE"
  ACCT_PASS="AccountingStoragePass=$DIR/munge/munge.socket"   # the slurmctld->slurmdbd link ignores AuthInfo=socket
  DBD_AUTH="AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket"
else
  AUTH_LINES="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=$CRED_EXPIRE"
  ACCT_PASS=""
  DBD_AUTH="AuthType=auth/none"
fi

if [ "$ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
$ACCT_PASS
JobAcctGatherType=jobacct_gather/linux"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

NODE_LINES=""
for ((i = 0; i < NODES; i++)); do
  NODE_LINES+="NodeName=${NAMES[$i]} NodeHostname=$H NodeAddr=127.0.0.1 Port=${SLURMD_PORTS[$i]} CPUs=$NCPU Boards=1 SocketsPerBoard=1 CoresPerSocket=$NCPU ThreadsPerCore=1 RealMemory=$MEM State=UNKNOWN
"
done

cat >"$CONF" <<EOF
# generated by slurm_local_start.sh
ClusterName=localtest
FirstJobId=$FIRST_JOB_ID
SlurmctldHost=$H(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=${SLURMD_PORTS[0]}
SlurmUser=root
SlurmdUser=root
$AUTH_LINES
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/%n.slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=$CTLD_DEBUG
SlurmdDebug=info
# no cgroups in the sandbox
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
$ACCT_LINES
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# batch_sched_delay=0: start batch jobs at the next 1 s tick (the default defers them up to 3 s)
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# trust the CPUs/RealMemory given here, even when larger than the hardware (no DRAIN)
SlurmdParameters=config_overrides
# bind slurmctld/slurmd to the address of the host name (127.0.0.1 here), not to 0.0.0.0
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
$NODE_LINES
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# NoInAddrAny binds to what the host name resolves to; do not use it when that is not loopback
if [ "$(getent ahostsv4 "$H" | awk 'NR==1{print $1}')" != 127.0.0.1 ]; then
  sed -i 's/^CommunicationParameters=.*/# CommunicationParameters: hostname does not resolve to 127.0.0.1, keeping INADDR_ANY/' "$CONF"
fi

if [ "$ACCOUNTING" = 1 ]; then
  # slurmdbd reads slurmdbd.conf next to $SLURM_CONF; it must be mode 600 and owned by SlurmUser.
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
$DBD_AUTH
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
fi

# ---------------------------------------------------------------- daemons
T_DAEMONS=$(now)
if [ "$AUTH" = munge ]; then
  # munged refuses a socket whose directory or any parent lacks o+x (e.g. pytest's
  # /tmp/pytest-of-root is 0700): "Socket is inaccessible: execute permissions for all
  # required". --force lets it run anyway (only root can reach the socket then, which is
  # fine here, since every daemon and job runs as root).
  MUNGE_FORCE=""
  d="$DIR/munge"
  while [ "$d" != / ]; do
    if [ $(( 0$(stat -c %a "$d") & 1 )) -eq 0 ]; then MUNGE_FORCE=--force; log "note: $d is not o+x, starting munged with --force"; break; fi
    d=$(dirname "$d")
  done
  munged $MUNGE_FORCE --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
         --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
         --seed-file="$DIR/munge/munged.seed" </dev/null >/dev/null 2>&1 \
    || { cat "$DIR/log/munged.log" >&2 || true; die "munged failed to start"; }
  wait_for "munged" sh -c "munge -n -S '$DIR/munge/munge.socket' | unmunge -S '$DIR/munge/munge.socket'"
fi

if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p "$DIR/mysql/data"
  # Empty datadir + --skip-grant-tables: no mariadb-install-db (which would need mariadb-client's
  # my_print_defaults) and no users/passwords. TCP on 127.0.0.1 only.
  # All fds go to files, so a caller that captures our stdout/stderr does not hang on them.
  setsid mariadbd --no-defaults --datadir="$DIR/mysql/data" --socket="$DIR/mysql/mysqld.sock" \
    --pid-file="$DIR/run/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --user=root \
    --skip-grant-tables --skip-name-resolve --log-error="$DIR/log/mariadb.log" \
    --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
    </dev/null >>"$DIR/log/mariadb.out" 2>&1 &
  wait_for "mariadbd on 127.0.0.1:$DB_PORT" port_in_use "$DB_PORT"
  slurmdbd </dev/null >/dev/null 2>&1 || die "slurmdbd failed to start (see $DIR/log/slurmdbd.log)"
  wait_for "slurmdbd on 127.0.0.1:$DBD_PORT" port_in_use "$DBD_PORT"
fi

slurmctld -f "$CONF" </dev/null >/dev/null 2>&1 || die "slurmctld failed to start (see $DIR/log/slurmctld.log)"
for n in "${NAMES[@]}"; do
  mkdir -p "$DIR/spool/slurmd-$n"
  slurmd -f "$CONF" -N "$n" </dev/null >/dev/null 2>&1 || die "slurmd -N $n failed to start (see $DIR/log/slurmd-$n.log)"
done

all_idle() {
  local out
  out=$(sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  [ "$(grep -c ' idle$' <<<"$out")" -eq "$NODES" ]
}
wait_for "all $NODES node(s) idle in sinfo" all_idle
if [ "$ACCOUNTING" = 1 ]; then
  wait_for "cluster registered in slurmdbd" sh -c "timeout 5 sacctmgr -n -P list cluster format=cluster | grep -qx localtest"
  wait_for "sacct" timeout 5 sacct -n -X
fi
log "daemons ready in $(elapsed "$T_DAEMONS")s (script total $(elapsed "$T_ALL")s)"

cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
sinfo >&2
echo "export SLURM_CONF=$CONF"
