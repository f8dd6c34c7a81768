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
# starts or is stopped ends the run within DISTCLIP_WATCHDOG_TIMEOUT seconds, named. DISTCLIP_WATCHDOG_DIR is the parent
# folder (on a file system every host shares when HOSTS or HOSTFILE name several) in which the watchdog makes this
# run's own folder, .distclip-watchdog-$DISTCLIP_WATCHDOG_RUN (mode 0700); the last rank out removes what it made.
if [[ -z "${DISTCLIP_WATCHDOG_DIR:-}" ]]; then
  if [[ -n "${HOSTS:-}${HOSTFILE:-}" ]]; then DISTCLIP_WATCHDOG_DIR="$PWD"; else DISTCLIP_WATCHDOG_DIR="${TMPDIR:-/tmp}"; fi
fi
export DISTCLIP_WATCHDOG_DIR
# Unguessable, so that nobody can make the folder first (the watchdog would refuse it, and the run would not start).
export DISTCLIP_WATCHDOG_RUN="${DISTCLIP_WATCHDOG_RUN:-$(date +%s)-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}"
export DISTCLIP_WATCHDOG_TIMEOUT="${DISTCLIP_WATCHDOG_TIMEOUT:-50}"
watchdog=(python -m distclip.cluster.watchdog --)
