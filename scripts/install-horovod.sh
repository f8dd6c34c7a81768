#!/usr/bin/env bash
# Builds Horovod 0.28.1 from its source release, with our patch (scripts/horovod-0.28.1-tf2.19.patch), against the
# TensorFlow of a given Python environment, and installs it there. Horovod's last release does not build against
# TensorFlow 2.19 and later; the patch's changes are guarded by TensorFlow's version, so 2.17 and 2.18 build too.
#
#   bash scripts/install-horovod.sh /path/to/env/bin/python     # default: the `python` first on PATH
#
# Needs a C++ compiler, cmake, make, patch and MPI's development files (Debian:
# apt-get install cmake g++ make patch openmpi-bin libopenmpi-dev). Builds the CPU operations with the MPI and
# Gloo controllers; HOROVOD_GPU_OPERATIONS=NCCL (with CUDA and NCCL present) adds the GPU ones.
# The built wheel is cached in ${DISTCLIP_CACHE:-$HOME/.cache/distclip}/wheels/, keyed by the Horovod, TensorFlow
# and Python versions, the patch and the GPU setting, so another environment with the same TensorFlow installs
# it in seconds (scripts/setup.sh uses the same cache). Rebuild whenever TensorFlow's version changes.
# Do not `pip install horovod[tensorflow]`: that extra installs the newest TensorFlow over the one Horovod was
# built against, and the import then fails with an undefined symbol.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-python}"
cache="${DISTCLIP_CACHE:-$HOME/.cache/distclip}"
hvd_version=0.28.1
patch_file="$root/scripts/horovod-0.28.1-tf2.19.patch"
log() { printf '[install-horovod] %s\n' "$*" >&2; }

command -v "$python" >/dev/null || { log "no Python at '$python'"; exit 2; }
pip=("$python" -m pip --disable-pip-version-check -q)
# The TensorFlow distribution (tensorflow, tensorflow-cpu, a vendor build) and its version, in that environment.
read -r tf_dist tf_version py_tag < <("$python" - 2>/dev/null <<'EOF'
import sys
from importlib import metadata
import tensorflow as tf
names = [d.metadata["Name"] for d in metadata.distributions()
         if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-").startswith(("tensorflow", "tf-"))]
dist = next((n for n in names if n.lower().replace("_", "-") in ("tensorflow", "tensorflow-cpu", "tf-nightly")), "")
print(dist.lower().replace("_", "-") or "tensorflow-unknown", tf.__version__, "%d%d" % sys.version_info[:2])
EOF
) || { log "'$python' cannot import tensorflow: install TensorFlow there first"; exit 2; }

missing=()
for tool in c++ cmake make patch mpicxx; do command -v "$tool" >/dev/null || missing+=("$tool"); done

patch_tag="$(sha256sum "$patch_file" | cut -c1-12)"
# The key names the distribution only when it is not tensorflow-cpu, so that setup.sh's wheels keep their names.
dist_tag=""; [[ "$tf_dist" == tensorflow-cpu ]] || dist_tag="-$tf_dist"
wheels="$cache/wheels/horovod-$hvd_version-tf-$tf_version$dist_tag-py$py_tag-patch-$patch_tag${HOROVOD_GPU_OPERATIONS:+-gpu-$HOROVOD_GPU_OPERATIONS}"
if ! compgen -G "$wheels/horovod-*.whl" >/dev/null; then
  if ((${#missing[@]})); then
    log "building Horovod needs ${missing[*]} (Debian: apt-get install cmake g++ make patch openmpi-bin libopenmpi-dev)"
    exit 2
  fi
  sdist="$cache/sdist/horovod-$hvd_version.tar.gz"
  if [[ ! -f "$sdist" ]]; then
    "${pip[@]}" download --no-deps --no-binary :all: -d "$cache/sdist" "horovod==$hvd_version"
  fi
  # A build without isolation uses that environment's setuptools; before 70.1 it needs the wheel package.
  "$python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 71)' 2>/dev/null ||
    "$python" -c 'import wheel' 2>/dev/null || "${pip[@]}" install wheel
  src="$(mktemp -d)"
  trap 'rm -rf "$src"' EXIT
  tar -xzf "$sdist" -C "$src"
  patch -d "$src/horovod-$hvd_version" -p1 --quiet < "$patch_file"
  log "building Horovod $hvd_version (patched) against $tf_dist $tf_version (about 8 minutes on 2 cores)"
  mkdir -p "$wheels.tmp"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
    "${pip[@]}" wheel --no-build-isolation --no-deps -w "$wheels.tmp" "$src/horovod-$hvd_version"
  rm -rf "$wheels"; mv "$wheels.tmp" "$wheels"
fi
# --no-deps: Horovod's own requirements would not pull TensorFlow, but its runtime ones are listed here instead.
"${pip[@]}" install --no-deps --force-reinstall "$wheels"/horovod-*.whl
"$python" -c 'import cloudpickle, psutil, yaml' 2>/dev/null || "${pip[@]}" install cloudpickle psutil pyyaml

# Check what was built: Horovod must list TensorFlow and both controllers.
build="$("$("$python" -c 'import sys, os; print(os.path.dirname(sys.executable))')/horovodrun" --check-build 2>/dev/null)"
for want_line in '\[X\] TensorFlow' '\[X\] MPI' '\[X\] Gloo'; do
  grep -q "$want_line" <<<"$build" || { echo "$build" >&2; log "horovodrun --check-build lacks ${want_line//\\/}"; exit 1; }
done
log "Horovod $hvd_version installed for $tf_dist $tf_version ($python)"
