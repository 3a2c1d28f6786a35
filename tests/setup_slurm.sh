#!/usr/bin/env bash
# What the SLURM tests (tests/test_slurm.py) need from the machine: Debian's SLURM 22.05 daemons and
# client, munge, and the test cluster's node names n1 n2 resolving to 127.0.0.1. Installed only when
# running as root (CI is) and missing; otherwise it says so and the SLURM tests skip with the reason.
# `make setup-slurm` (and `make setup`, `make test`) call it; it never fails the set-up.
set -uo pipefail
packages=(slurmd slurmctld slurm-client munge)
commands=(slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged)

missing_commands() {
  local c
  for c in "${commands[@]}"; do PATH="$PATH:/usr/sbin:/sbin" command -v "$c" >/dev/null || echo "$c"; done
}

if [ "$(id -u)" != 0 ]; then
  [ -z "$(missing_commands)" ] || echo "setup-slurm: not root: the SLURM tests will be skipped (run 'make setup-slurm' as root to install ${packages[*]})"
  exit 0
fi

if [ -n "$(missing_commands)" ]; then
  if ! command -v apt-get >/dev/null; then
    echo "setup-slurm: no apt-get: install ${packages[*]} (SLURM 22.05 or later) by hand; the SLURM tests are skipped until then"
    exit 0
  fi
  # A fresh machine may have no package lists yet: fetch them only when a package has no candidate.
  if apt-cache policy "${packages[@]}" | grep -q "Candidate: (none)" || [ "$(apt-cache policy "${packages[@]}" | grep -c Candidate:)" -lt ${#packages[@]} ]; then
    apt-get update -qq
  fi
  echo "setup-slurm: installing ${packages[*]} with apt-get"
  # Any daemons the packages start for the system are not used: the tests run their own cluster.
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/tmp/switchyard-setup-slurm.log 2>&1; then
    tail -n 20 /tmp/switchyard-setup-slurm.log
    echo "setup-slurm: apt-get install ${packages[*]} failed (log above); the SLURM tests will be skipped"
    exit 0
  fi
fi

# The test cluster's two nodes live on this machine under the names n1 and n2.
if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
  echo "127.0.0.1 n1 n2  # switchyard SLURM test cluster (tests/slurm_cluster.py)" >>/etc/hosts
  echo "setup-slurm: added n1 n2 -> 127.0.0.1 to /etc/hosts"
fi
