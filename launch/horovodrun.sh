#!/usr/bin/env bash
# Horovod started by horovodrun: NP processes on this machine, or on HOSTS ("host1:4,host2:4").
#   NP=2 launch/horovodrun.sh                              # distclip train --strategy horovod, over Gloo
#   HOROVOD_CONTROLLER=mpi NP=2 launch/horovodrun.sh python my_train.py
# Gloo: a worker that dies makes the others fail within HOROVOD_GLOO_TIMEOUT_SECONDS (default here 60).
# MPI: Open MPI ends the whole job when one process dies abnormally.
# A rank that exits with status 0 early, never starts or is stopped: distclip.cluster.watchdog (see env.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
NP="${NP:-2}"
(($#)) || set -- distclip train --strategy horovod
# On this machine alone, in a private network namespace: horovodrun's rendezvous server and Gloo
# listen on every interface, unauthenticated (see distclip/netns.py and the README's Security section).
local=(python -m distclip.cluster.netns)
[[ -n "${HOSTS:-}" ]] && local=()
exec "${local[@]}" horovodrun "--${HOROVOD_CONTROLLER:-gloo}" -np "$NP" -H "${HOSTS:-localhost:$NP}" "${watchdog[@]}" "$@"
