#!/usr/bin/env bash
# Horovod over MPI, started by horovodrun: NP processes on this machine, or on HOSTS ("host1:4,host2:4").
#   NP=2 launch/horovodrun-mpi.sh                          # distclip train --strategy horovod
# Open MPI ends the whole job when one process dies abnormally.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
NP="${NP:-2}"
HOSTS="${HOSTS:-localhost:$NP}"
(($#)) || set -- distclip train --strategy horovod
exec horovodrun --mpi -np "$NP" -H "$HOSTS" "$@"
