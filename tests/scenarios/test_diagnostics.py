"""Non-finite attribution, the gradient noise scale, rewind and skip_spikes across processes: Horovod and
MultiWorkerMirroredStrategy."""
import json
import os
import shutil

import pytest

from procs import WORKERS, python, run_all

pytestmark = pytest.mark.slow

ROOT_OK = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
D, S2 = 8, 1.0
TRUE_G2, TRUE_TRACE = 1.0, D * (1.0 + S2) + 1.0  # see tests/unit/test_diagnostics.py
TOLERANCE = 0.2


@pytest.mark.parametrize("mode", ["horovod", "multiworker"])
def test_attribution_noise_scale_and_rewind_across_processes(tmp_path, mode):
    worker = os.path.join(WORKERS, "diagnostics.py")
    if mode == "horovod":
        launcher = [os.path.join(os.path.dirname(python()), "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2"]
    else:
        if shutil.which("mpirun") is None:
            pytest.fail("mpirun is not installed: run scripts/setup.sh")
        launcher = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none"]
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **ROOT_OK)
    (r,) = run_all([launcher + [python(), worker, mode, str(tmp_path)]], [env], timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1]  # every process saw the same, places and rewound weights included
    places = ranks[0]["places"]
    assert [(p[0], p[1]) for p in places] == [(0, 0), (1, 1)]  # replica r runs on worker (rank) r
    assert all(p[3] == "CPU:0" for p in places)
    for case in ranks[0]["cases"]:
        expected_replicas = [i == case["bad"] for i in range(2)]
        expected_variables = [case["bad"] >= 0 and i == case["variable"] for i in range(4)]
        assert case["finite"] == (case["bad"] < 0)
        assert case["replicas"] == expected_replicas, case
        assert case["variables"] == expected_variables, case
        assert case["state"] == [[int(v) for v in expected_replicas], [int(v) for v in expected_variables]]
    assert ranks[0]["skipped"] == 3
    g2, trace, b_simple = ranks[0]["noise"]
    assert g2 == pytest.approx(TRUE_G2, rel=TOLERANCE)
    assert trace == pytest.approx(TRUE_TRACE, rel=TOLERANCE)
    assert b_simple == pytest.approx(TRUE_TRACE / TRUE_G2, rel=TOLERANCE)
    # A spike at update 10 goes back to the snapshot before update 4; bit for bit the run without updates 4-12.
    assert ranks[0]["rewind"] == [10, 4, 12, False]
    assert ranks[0]["rewind_equals_oracle"]
    # Skipping the spike instead: bit for bit the run that never saw batch 9.
    assert ranks[0]["skipped_spikes"] == 1 and ranks[0]["skip_equals_oracle"]
    # With a learning-rate ramp and Adam's moments reset after it: the same changes made by hand.
    assert ranks[0]["after_equals_oracle"]
