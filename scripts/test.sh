#!/usr/bin/env bash
# The README's test command: makes sure the real services the tests use are installed
# (Azurite from the npm registry; OpenSSH's sshd, Slurm, MUNGE and Chromium from Debian), then runs pytest.
# The tests start those services themselves, on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .cache/npm/node_modules/.bin/azurite ]; then
  echo "== installing Azurite (npm) into .cache/npm"
  npm install --silent --no-audit --no-fund --prefix .cache/npm azurite@3 >/dev/null
fi
apt_install() {  # quiet apt-get install, through sudo when not root
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  echo "== installing openssh-server (apt)"
  apt_install openssh-server openssh-client
fi
# A real Slurm for the Slurm backend's tests (tests/slurm_util.py starts a private cluster on
# loopback). slurm-wlm brings slurmctld, slurmd and the client commands; the tests run their own
# munged with their own key, so the packaged services need not be running.
if [ ! -x /usr/sbin/slurmctld ] || [ ! -x /usr/sbin/slurmd ] || [ ! -x /usr/sbin/munged ] || ! command -v sbatch >/dev/null 2>&1; then
  echo "== installing slurm-wlm and munge (apt)"
  apt_install slurm-wlm munge
fi
# A real browser for the report page (tests/test_report_html.py renders report.html headless).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (apt)"
  apt_install chromium
fi

# One pytest worker per core, up to 4 (pytest-xdist): most tests wait on a subprocess or run one
# thread (OMP_NUM_THREADS=1), so on 2 cores two workers halve the wall time. `-n 0` runs serially.
# --dist loadgroup: tests marked with one xdist_group share a worker (the Ray tests: one cluster).
python -m pytest -q -n auto --maxprocesses 4 --dist loadgroup --durations=10 "$@"   # the 10 slowest tests, every run
