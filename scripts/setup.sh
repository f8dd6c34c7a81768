#!/usr/bin/env bash
# Installs everything distclip needs on a fresh Debian 12 / Python 3.11 machine, as root:
# Debian's Open MPI, a venv at .venv/, the pinned Python stack (constraints.txt),
# Horovod 0.28.1 built from source against the pinned TensorFlow, and distclip itself (editable).
#
# Idempotent. The Horovod wheel is cached outside the checkout, keyed by the Horovod and
# TensorFlow versions, in ${DISTCLIP_CACHE:-$HOME/.cache/distclip}; a second run that finds
# the venv up to date with constraints.txt and pyproject.toml does nothing but check.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${DISTCLIP_CACHE:-$HOME/.cache/distclip}"
py="${PYTHON:-python3}"
venv="$root/.venv"
tf_version="$(sed -n 's/^tensorflow-cpu==//p' constraints.txt)"
hvd_version="$(sed -n 's/^horovod==//p' constraints.txt)"
log() { printf '[setup] %s\n' "$*" >&2; }

# 1. System packages: Open MPI (Horovod's MPI controller, mpi4py, mpirun) and Slurm.
# Slurm (slurmctld, slurmd, srun, sbatch, munge) for the sbatch templates and their tests.
apt_pkgs=(openmpi-bin libopenmpi-dev cmake g++ make slurmctld slurmd slurm-client munge)
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
want="$(cat constraints.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && "$venv/bin/python" -c "import distclip, horovod.tensorflow" 2>/dev/null; then
  log "up to date ($venv)"
  exit 0
fi
[[ -x "$venv/bin/python" ]] || { log "creating $venv"; "$py" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -c constraints.txt pip wheel setuptools
# Everything pinned except Horovod, which must be built against the TensorFlow installed here.
grep -v '^horovod==' constraints.txt > "$venv/constraints-no-horovod.txt"
log "installing the pinned stack (TensorFlow $tf_version)"
"${pip[@]}" install -r "$venv/constraints-no-horovod.txt"

# 3. Horovod from source, once per (Horovod, TensorFlow) pair; the wheel is kept in the cache.
wheels="$cache/wheels/horovod-$hvd_version-tf-$tf_version-py$("$venv/bin/python" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
if ! compgen -G "$wheels/horovod-*.whl" >/dev/null; then
  log "building Horovod $hvd_version against TensorFlow $tf_version (about 4 minutes on 2 cores)"
  mkdir -p "$wheels.tmp"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
    "${pip[@]}" wheel --no-build-isolation --no-deps -w "$wheels.tmp" "horovod==$hvd_version"
  rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
fi
"${pip[@]}" install --no-deps --force-reinstall "$wheels"/horovod-*.whl

# 4. distclip itself, editable, with its console script.
"${pip[@]}" install --no-deps --no-build-isolation -e .

# 5. Check what was built: Horovod must list TensorFlow and both controllers.
build="$("$venv/bin/horovodrun" --check-build 2>/dev/null)"
for want_line in '\[X\] TensorFlow' '\[X\] MPI' '\[X\] Gloo'; do
  grep -q "$want_line" <<<"$build" || { echo "$build" >&2; log "horovodrun --check-build lacks ${want_line//\\/}"; exit 1; }
done
"$venv/bin/python" -c 'import tensorflow as tf, keras, horovod, mpi4py
print(f"[setup] TensorFlow {tf.__version__}, Keras {keras.__version__}, Horovod {horovod.__version__} (TensorFlow, MPI, Gloo), mpi4py {mpi4py.__version__}")' 2>/dev/null
echo "$want" > "$stamp"
log "done: $venv"
