#!/usr/bin/env bash
# Horovod (or mpi4py, or MultiWorkerMirroredStrategy via distclip.cluster.set_tf_config) under plain mpirun.
#   NP=2 launch/mpirun.sh                                  # distclip train --strategy horovod
#   NP=2 launch/mpirun.sh distclip train --strategy multiworker
#   NP=8 HOSTFILE=hosts launch/mpirun.sh python my_train.py
# Open MPI ends the whole job when one process dies abnormally; distclip.cluster.watchdog (see env.sh) when one
# exits with status 0 early, never starts or is stopped.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
NP="${NP:-2}"
(($#)) || set -- distclip train --strategy horovod
hosts=()
local=(python -m distclip.cluster.netns)  # on this machine alone: loopback only (see horovodrun.sh)
[[ -n "${HOSTFILE:-}" ]] && hosts=(--hostfile "$HOSTFILE") && local=()
# --bind-to none: TensorFlow runs its own thread pools; -x passes the environment Horovod and TF read.
exec "${local[@]}" mpirun -np "$NP" "${hosts[@]}" --oversubscribe --bind-to none \
  -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x TF_CPP_MIN_LOG_LEVEL -x DISTCLIP_WATCHDOG_DIR -x DISTCLIP_WATCHDOG_RUN \
  -x DISTCLIP_WATCHDOG_TIMEOUT \
  "${watchdog[@]}" "$@"
