#!/usr/bin/env bash
# Horovod over Gloo, started by horovodrun (see horovodrun.sh): NP=2 launch/horovodrun-gloo.sh [COMMAND...]
HOROVOD_CONTROLLER=gloo exec "$(dirname "${BASH_SOURCE[0]}")/horovodrun.sh" "$@"
