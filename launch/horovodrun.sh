#!/usr/bin/env bash
# Horovod started by horovodrun: NP processes on this machine, or on HOSTS ("host1:4,host2:4").
#   NP=2 launch/horovodrun.sh                              # distclip train --strategy horovod, over Gloo
#   HOROVOD_CONTROLLER=mpi NP=2 launch/horovodrun.sh python my_train.py
# Gloo: a worker that dies makes the others fail within HOROVOD_GLOO_TIMEOUT_SECONDS (default here 60).
# MPI: Open MPI ends the whole job when one process dies abnormally.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
NP="${NP:-2}"
HOSTS="${HOSTS:-localhost:$NP}"
(($#)) || set -- distclip train --strategy horovod
exec horovodrun "--${HOROVOD_CONTROLLER:-gloo}" -np "$NP" -H "$HOSTS" "$@"
