#!/usr/bin/env bash
# MultiWorkerMirroredStrategy on this machine: NP workers, each with its own TF_CONFIG on free ports.
#   NP=2 launch/multiworker.sh                             # distclip train --strategy multiworker
#   NP=4 launch/multiworker.sh python my_train.py
# Signals are forwarded; if a worker dies the others are stopped and this exits non-zero
# naming the worker. TIMEOUT (seconds) bounds the whole run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
NP="${NP:-2}"
(($#)) || set -- distclip train --strategy multiworker
exec python -m distclip.cluster.launcher --nproc "$NP" ${TIMEOUT:+--timeout "$TIMEOUT"} -- "$@"
