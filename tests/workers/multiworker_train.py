"""One worker of a 2-process MultiWorkerMirroredStrategy run (TF_CONFIG set by the parent test).

Trains with ClipStep on its shard of the global batch and writes what it ended
with to argv[1] as JSON.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

# The strategy must exist before any other TensorFlow op. A dead peer fails the
# collectives after this many seconds instead of waiting forever.
strategy = tf.distribute.MultiWorkerMirroredStrategy(
    communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60.0)
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import distributed_train  # noqa: E402

clip_norm, steps = float(sys.argv[2]), int(sys.argv[3])
weights, norms, per_replica, _ = distributed_train(strategy, clip_norm, steps, "adam")
with open(sys.argv[1], "w") as f:
    json.dump({"weights": [w.tolist() for w in weights], "norms": norms,
               "task": json.loads(os.environ["TF_CONFIG"])["task"]["index"]}, f)
