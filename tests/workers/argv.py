"""Writes this task's arguments (after OUT_DIR) as JSON to OUT_DIR/<rank>: `argv.py OUT_DIR ARGS...`.

The rank is the launcher's: horovodrun's or mpirun's first (under sbatch they inherit the batch
step's SLURM_PROCID), else srun's."""
import json
import os
import sys

rank = os.environ.get("HOROVOD_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("SLURM_PROCID", "0")
with open(os.path.join(sys.argv[1], rank), "w") as f:
    json.dump(sys.argv[2:], f)
