"""One process of a 2-process contract run (tests/contract.py): every Keras optimizer through distclip.

    contract_worker.py multiworker OUT    # TF_CONFIG from the parent test
    horovodrun -np 2 python contract_worker.py horovod OUT

Writes OUT with {rank} replaced: per case, what differs from the single-device
reference (an empty list when nothing does) and a digest of the final values,
which must be the same on both processes.
"""
import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

engine_name, out_path = sys.argv[1], sys.argv[2]
if engine_name == "multiworker":
    # The strategy must exist before any other TensorFlow op; a dead peer fails the collectives in 60 s.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(timeout_seconds=60.0))
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    backend = dict(strategy=strategy, replicas=2)
else:
    import horovod.tensorflow as hvd

    hvd.init()
    rank = hvd.rank()
    backend = dict(replica=rank, replicas=2, mean=True)  # Horovod's convention: each rank's loss is its mean

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import contract  # noqa: E402

results = {}
cases = contract.across_processes_cases()
for kind, name, api, lazy in cases:
    key = f"{kind} {name} {api} {'lazy' if lazy else 'built'}"
    try:
        check = {"match": contract.check_case, "skip": contract.check_skip, "zclip": contract.check_zclip,
                 "agc": contract.check_agc, "groups": contract.check_groups}[kind]
        found, run = check(name, api, lazy, **backend)
        digest = hashlib.sha256(b"".join(v.tobytes() for v in (run.history[-1] if run else []))).hexdigest()
    except Exception as e:  # reported per case, so one failure does not hide the others
        found, digest = [f"{type(e).__name__}: {e}"], None
    results[key] = {"mismatches": found, "digest": digest}
    print(key, "OK" if not found else found, flush=True)
with open(out_path.replace("{rank}", str(rank)), "w") as f:
    json.dump(results, f)
