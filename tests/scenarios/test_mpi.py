"""distclip under a bare MPI world (mpirun -np 2, no Horovod, no strategy): checks and broadcasts go through
mpi4py; the clip step refuses to run unsynchronized instead of clipping each process's own gradients."""
import json
import os

from procs import WORKERS, python, require, run_all


def test_mpi_world_verifies_and_broadcasts_and_the_clip_step_refuses_it(tmp_path):
    require("mpirun", modules=["mpi4py"])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    mpirun = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "PYTHONPATH"]
    (r,) = run_all([[python(), "-m", "distclip.cluster.netns"] + mpirun +
                    [python(), os.path.join(WORKERS, "mpi_world.py"), str(tmp_path)]], [env], timeout=180)
    assert r.returncode == 0, r.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for i, report in enumerate(ranks):
        assert report["backend"] == ["mpi", 2, i, 2]
        assert report["broadcast"] == [0.0, 10.0]  # rank 0's values, on rank 1 too
        assert "variable" in report["mismatch"] and "differs across replicas" in report["mismatch"]
        assert "hvd.init()" in report["auto"] and "backend='none'" in report["auto"]
        assert report["none"] == 5.0
    assert ranks[0]["checksums"] == ranks[1]["checksums"]
