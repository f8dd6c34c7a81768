#!/usr/bin/env bash
# Horovod over MPI, started by horovodrun (see horovodrun.sh): NP=2 launch/horovodrun-mpi.sh [COMMAND...]
HOROVOD_CONTROLLER=mpi exec "$(dirname "${BASH_SOURCE[0]}")/horovodrun.sh" "$@"
