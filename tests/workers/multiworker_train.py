"""One worker of a 2-process MultiWorkerMirroredStrategy run.

TF_CONFIG comes from the parent test, or, under mpirun or srun, from
distclip.cluster.set_tf_config (free ports allgathered with mpi4py). Trains
with ClipStep on its shard of the global batch, checks verify_replicas, and
writes what it ended with to argv[1] as JSON ({rank} in the path is replaced).
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import distclip.cluster  # noqa: E402  (imports TensorFlow, but creates no op)
import tensorflow as tf  # noqa: E402

distclip.cluster.set_tf_config()

# The strategy must exist before any other TensorFlow op. A dead peer fails the
# collectives after this many seconds instead of waiting forever.
strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60.0)
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import distributed_train  # noqa: E402

clip_norm, steps = float(sys.argv[2]), int(sys.argv[3])
weights, norms, per_replica, objs = distributed_train(strategy, clip_norm, steps, "adam")
checksums = distclip.verify_replicas(objs["model"].variables + objs["optimizer"].variables)
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
with open(sys.argv[1].replace("{rank}", str(task)), "w") as f:
    json.dump({"weights": [w.tolist() for w in weights], "norms": norms, "task": task, "checksums": checksums}, f)
