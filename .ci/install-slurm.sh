#!/usr/bin/env bash
# Installs the Debian packages the real-Slurm tests (tests/slurm/) need: a single-machine cluster of
# slurmctld + slurmd (+ slurmdbd on MariaDB, so that `sacct` works: submitit reads job states from it).
# Idempotent: does nothing when every program is already there. Needs root (apt-get); nothing is
# started (the test fixture starts the daemons by hand, see tests/slurm/slurm_local_start.sh).
set -euo pipefail

need=()
command -v slurmctld >/dev/null || need+=(slurmctld)
command -v slurmd    >/dev/null || need+=(slurmd)
command -v sbatch    >/dev/null || need+=(slurm-client)
command -v munged    >/dev/null || need+=(munge)
command -v slurmdbd  >/dev/null || need+=(slurmdbd)
# mariadb-server-core (the mariadbd binary) only: `mariadb-server` would pull in perl (~190 MB).
command -v mariadbd  >/dev/null || need+=(mariadb-server-core)

if [ ${#need[@]} -eq 0 ]; then
  echo "install-slurm: slurmctld, slurmd, slurm-client, munge, slurmdbd, mariadbd already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-slurm: root is needed to apt-get install: ${need[*]}" >&2
  exit 1
fi
echo "install-slurm: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq
# The postinst scripts print "invoke-rc.d: policy-rc.d denied execution of start" where no init system
# runs: expected, nothing is started.
apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${need[@]}" >/dev/null
echo "install-slurm: done"
