# Sourced by the launch scripts: the project's venv first on PATH, and Open MPI allowed to run as root.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$repo/.venv/bin/python" && ":$PATH:" != *":$repo/.venv/bin:"* ]]; then
  export PATH="$repo/.venv/bin:$PATH"
fi
if [[ "$(id -u)" == 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export HOROVOD_GLOO_TIMEOUT_SECONDS="${HOROVOD_GLOO_TIMEOUT_SECONDS:-60}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# Each rank runs under distclip.cluster.watchdog (python -m distclip.cluster.watchdog --help): a rank that exits early, never
# starts or is stopped ends the run within DISTCLIP_WATCHDOG_TIMEOUT seconds, named. Its folder is this run's
# own (on a file system every host shares when HOSTS or HOSTFILE name several); the last rank out removes it.
if [[ -z "${DISTCLIP_WATCHDOG_DIR:-}" ]]; then
  if [[ -n "${HOSTS:-}${HOSTFILE:-}" ]]; then base="$PWD"; else base="${TMPDIR:-/tmp}"; fi
  export DISTCLIP_WATCHDOG_DIR="$base/.distclip-watchdog-$(date +%s)-$$-$RANDOM"
fi
export DISTCLIP_WATCHDOG_TIMEOUT="${DISTCLIP_WATCHDOG_TIMEOUT:-50}"
watchdog=(python -m distclip.cluster.watchdog --)
