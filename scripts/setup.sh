#!/usr/bin/env bash
# Installs everything distclip needs on a fresh Debian 12 / Python 3.11 machine, as root:
# Debian's Open MPI and Slurm, a venv at .venv/, the pinned Python stack (constraints.txt,
# TensorFlow 2.21), Horovod 0.28.1 built from its source release with scripts/horovod-0.28.1-tf2.19.patch
# against the pinned TensorFlow, and distclip itself (editable).
#   bash scripts/setup.sh            # .venv: the newest tested set (constraints.txt)
#   bash scripts/setup.sh --tf2.17   # .venv-tf2.17: the oldest tested set (constraints-tf2.17.txt), for .ci/run
#
# Idempotent. The Horovod wheel is cached outside the checkout, keyed by the Horovod, TensorFlow and
# Python versions and the patch, in ${DISTCLIP_CACHE:-$HOME/.cache/distclip}; a second run that finds
# the venv up to date with its constraints, pyproject.toml and this script does nothing but check.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${DISTCLIP_CACHE:-$HOME/.cache/distclip}"
py="${PYTHON:-python3}"
constraints=constraints.txt venv="$root/.venv"
case "${1:-}" in
  "") ;;
  --tf2.17) constraints=constraints-tf2.17.txt venv="$root/.venv-tf2.17" ;;
  *) echo "usage: bash scripts/setup.sh [--tf2.17]" >&2; exit 2 ;;
esac
patch_file="$root/scripts/horovod-0.28.1-tf2.19.patch"
tf_version="$(sed -n 's/^tensorflow-cpu==//p' "$constraints")"
log() { printf '[setup] %s\n' "$*" >&2; }

# 1. System packages: Open MPI (Horovod's MPI controller, mpi4py, mpirun) and Slurm.
# Slurm (slurmctld, slurmd, srun, sbatch, munge) for the sbatch templates and their tests.
apt_pkgs=(openmpi-bin libopenmpi-dev cmake g++ make patch slurmctld slurmd slurm-client munge)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. The venv and the pinned stack.
stamp="$venv/.distclip-setup"
want="$(cat "$constraints" pyproject.toml scripts/setup.sh scripts/install-horovod.sh "$patch_file" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import distclip, horovod.tensorflow" 2>/dev/null; then
  log "up to date ($venv)"
  exit 0
fi
[[ -x "$venv/bin/python" ]] || { log "creating $venv"; "$py" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c constraints.txt pip wheel setuptools
# Everything pinned except Horovod, which must be built against the TensorFlow installed here.
grep -v '^horovod==' "$constraints" > "$venv/constraints-no-horovod.txt"
log "installing the pinned stack (TensorFlow $tf_version)"
"${pip[@]}" install -r "$venv/constraints-no-horovod.txt"

# 3. Horovod from its source release plus our patch, built against the TensorFlow installed here, by
# scripts/install-horovod.sh (the command users run for their own environment): once per (Horovod, TensorFlow,
# Python, patch); the wheel is kept in the cache.
DISTCLIP_CACHE="$cache" bash "$root/scripts/install-horovod.sh" "$venv/bin/python"

# 4. distclip itself, editable, with its console script.
# Built in isolation: the package needs setuptools >= 77, and the venv keeps the setuptools Horovod was built with.
"${pip[@]}" install --no-deps -e .

# 5. What was installed.
"$venv/bin/python" -c 'import tensorflow as tf, keras, horovod, mpi4py
print(f"[setup] TensorFlow {tf.__version__}, Keras {keras.__version__}, Horovod {horovod.__version__} (TensorFlow, MPI, Gloo), mpi4py {mpi4py.__version__}")' 2>/dev/null
echo "$want" > "$stamp"
log "done: $venv"
