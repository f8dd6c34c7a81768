"""Keras as the oracle across processes: every optimizer through 2-process MultiWorkerMirroredStrategy and
horovodrun -np 2 equals its own apply on one device (the cases of tests/contract.py; in one process:
tests/unit/test_optimizer.py, which runs every optimizer in every variant)."""
import json
import os


import contract
from procs import WORKERS, free_ports, python, run_all


WORKER = os.path.join(WORKERS, "contract_worker.py")


def _check_workers(outs):
    ranks = [json.loads(o.read_text()) for o in outs]
    cases = contract.across_processes_cases()
    assert len(ranks[0]) == len(cases)
    # Every exported optimizer, every (API, lazy) variant, every skip case ran.
    assert {name for _, name, _, _ in cases} == set(contract.exported())
    assert {(api, lazy) for _, _, api, lazy in cases} == {(a, z) for a in contract.APIS for z in (False, True)}
    assert {name for kind, name, _, _ in cases if kind == "skip"} == set(contract.SKIP_CASES)
    assert {api for kind, _, api, _ in cases if kind == "zclip"} == set(contract.APIS)  # a policy's state, synced
    assert {api for kind, _, api, _ in cases if kind == "agc"} == set(contract.APIS)  # against mirrored weights
    assert {api for kind, _, api, _ in cases if kind == "groups"} == set(contract.APIS)
    failed = {k: v["mismatches"] for k, v in ranks[0].items() if v["mismatches"]}
    assert not failed, failed
    # Both processes end with the same values, bit for bit.
    assert {k: v["digest"] for k, v in ranks[0].items()} == {k: v["digest"] for k, v in ranks[1].items()}


def test_under_two_process_multiworker_mirrored_strategy(tmp_path):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    commands, envs = [], []
    for i in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        envs.append(dict(os.environ, TF_CONFIG=json.dumps(config), TF_CPP_MIN_LOG_LEVEL="2"))
        commands.append([python(), WORKER, "multiworker", str(tmp_path / "w{rank}.json")])
    for i, r in enumerate(run_all(commands, envs, timeout=400)):
        assert r.returncode == 0, f"worker {i} exited {r.returncode}:\n{r.stdout[-3000:]}"
    _check_workers([tmp_path / "w0.json", tmp_path / "w1.json"])


def test_under_horovodrun(tmp_path):
    cmd = [os.path.join(os.path.dirname(python()), "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
           python(), WORKER, "horovod", str(tmp_path / "h{rank}.json")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    (r,) = run_all([cmd], [env], timeout=400)
    assert r.returncode == 0, f"horovodrun exited {r.returncode}:\n{r.stdout[-3000:]}"
    _check_workers([tmp_path / "h0.json", tmp_path / "h1.json"])
