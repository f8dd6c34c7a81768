#!/usr/bin/env bash
# Horovod over Gloo: NP processes on this machine, or on HOSTS ("host1:4,host2:4").
#   NP=2 launch/horovodrun-gloo.sh                         # distclip train --strategy horovod
#   NP=8 HOSTS=node1:4,node2:4 launch/horovodrun-gloo.sh python my_train.py
# A worker that dies makes the others fail within HOROVOD_GLOO_TIMEOUT_SECONDS (default here 60).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
NP="${NP:-2}"
HOSTS="${HOSTS:-localhost:$NP}"
(($#)) || set -- distclip train --strategy horovod
exec horovodrun --gloo -np "$NP" -H "$HOSTS" "$@"
