"""8 replicas of ClipStep under tf.distribute: MirroredStrategy over 8 logical CPUs in one process, or one of
4 MultiWorkerMirroredStrategy workers with 2 logical CPUs each (the several-devices-per-worker case of GPU nodes).

    eight_replicas.py mirrored|multiworker OUT CLIP_NORM STEPS POISON_STEP

At POISON_STEP one input of replica 5's shard is inf, so that step's synchronized norm is not finite and every
replica skips it. Writes OUT (with {rank} replaced by the worker's index) as JSON: the weights, the norms each
local replica saw, the skip count, whether this process's replicas hold identical values, verify_replicas's checksums,
and how many squared norms (L2Loss ops) the traced step holds.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tensorflow as tf  # noqa: E402

backend, out, clip_norm, steps, poison = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
devices = 8 if backend == "mirrored" else 2
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
if backend == "mirrored":
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(devices)])
else:  # TF_CONFIG from the test; a dead peer fails the collectives after 60 s instead of waiting forever
    # MultiWorkerMirroredStrategy takes every GPU of a worker as a replica, but on CPU one device only
    # (CollectiveAllReduceExtended._initialize_local_devices). To have the several-devices-per-worker case
    # of GPU nodes on this CPU machine, this worker's device list is its 2 logical CPUs; the strategy, its
    # collectives (within and across workers) and distclip run unchanged.
    from tensorflow.python.distribute import collective_all_reduce_strategy as collective

    collective.CollectiveAllReduceExtended._initialize_local_devices = (
        lambda self, resolver, worker: (tuple(f"{worker}/device:CPU:{i}" for i in range(devices)), "CPU"))
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60.0))
assert strategy.num_replicas_in_sync == 8, strategy.num_replicas_in_sync

import numpy as np  # noqa: E402

import distclip  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import GLOBAL_BATCH, distributed_train, global_batch  # noqa: E402
from graphs import op_types  # noqa: E402

batches = [global_batch(s) for s in range(steps)]
batches[poison][0][5 * (GLOBAL_BATCH // 8), 0] = np.inf  # replica 5's first row
weights, norms, per_replica, objs = distributed_train(strategy, clip_norm, steps, "adam", batches=batches)
checksums = distclip.verify_replicas(objs["model"].variables + objs["optimizer"].variables)
task = json.loads(os.environ.get("TF_CONFIG", '{"task": {"index": 0}}'))["task"]["index"]
local = strategy.experimental_local_results
with open(out.replace("{rank}", str(task)), "w") as f:
    json.dump({"task": task, "weights": [w.tolist() for w in weights],
               "norms": [[n if np.isfinite(n) else str(n) for n in step] for step in norms],
               "skipped": [int(v) for v in local(objs["clip"].skipped_steps)],
               "iterations": int(local(objs["optimizer"].iterations.value)[0]),
               "local_replicas": len(per_replica[0]),
               "local_replicas_identical": all(np.array_equal(v[0], r) for v in per_replica for r in v[1:]),
               "checksums": checksums,
               "squared_norms": [op_types(c.graph).count("L2Loss") for c in objs["step"]._list_all_concrete_functions()]},
              f)
