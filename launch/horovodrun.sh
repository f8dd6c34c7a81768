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
# Not exec'd: a SIGTERM (or Ctrl-C) to this script goes on to horovodrun, which passes it to each rank's
# watchdog; the ranks checkpoint and exit 143. horovodrun then exits 1 ("Exit code: 143" for a rank), or 0
# when it stops on a signal of its own first (seen once in four runs of tests/scenarios/test_resume.py). A
# signalled run ends here with 143 (130 for SIGINT), as distclip train and launch/multiworker.sh do, so
# `... && next` never runs after a stop. Job control (set -m) keeps the background horovodrun from ignoring SIGINT.
set -m
"${local[@]}" horovodrun "--${HOROVOD_CONTROLLER:-gloo}" -np "$NP" -H "${HOSTS:-localhost:$NP}" "${watchdog[@]}" "$@" &
child=$!
signalled=
trap 'signalled=143; kill -TERM "$child" 2>/dev/null || true' TERM
trap 'signalled=130; kill -INT "$child" 2>/dev/null || true' INT
while :; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break  # wait returned for a trapped signal: horovodrun still runs
done
[[ -n "$signalled" ]] && status=$signalled
exit "$status"
