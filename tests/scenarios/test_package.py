"""distclip as users install it: the sdist and wheel built from this checkout, installed into a fresh virtual
environment that holds only the tested TensorFlow set, and every script of examples/ run there from outside
the checkout; then Horovod built for that environment by scripts/install-horovod.sh, and the Horovod example.

The environment is made once for the module (about 30 s: pip reuses its downloads), from constraints.txt.
"""
from __future__ import annotations

import email.parser
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from procs import ROOT

# Its module-scoped fixtures are made once: under pytest-xdist every test of the module runs in one worker.
pytestmark = pytest.mark.xdist_group("package")

EXAMPLES = os.path.join(ROOT, "examples")
CONSTRAINTS = os.path.join(ROOT, "constraints.txt")
TF_VERSION = re.search(r"^tensorflow-cpu==(\S+)$", open(CONSTRAINTS).read(), re.M).group(1)
#: What the fresh environment starts with: the TensorFlow set users already have (no TensorBoard: TensorFlow
#: 2.21's wheel no longer brings it).
TENSORFLOW_SET = ["tensorflow-cpu", "keras"]
#: Packages that only some features use: none of them may be needed to install and import distclip.
OPTIONAL = {"horovod", "mpi4py", "matplotlib", "tensorboard"}
#: The examples that run in one process, with what each prints when its own checks passed.
SINGLE_PROCESS = {
    "custom_loop.py": "largest difference from single-device training with tf.clip_by_global_norm",
    "keras_fit.py": "largest difference from single-device fit with global_clipnorm",
    "mixed_precision.py": "largest difference between float16 and float32 weights",
    "gradient_accumulation.py": "largest weight difference",
    "adaptive_threshold.py": "steps clipped: [",
    "nonfinite_attribution.py": "named: step 3 from replica 1 on CPU:1",
}


def _run(cmd, env, cwd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _out(r: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(map(str, r.args))}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"


class Env:
    """The fresh environment: its python, a working folder outside the checkout, and a clean process env."""

    def __init__(self, folder):
        self.venv = str(folder / "venv")
        self.bin = os.path.join(self.venv, "bin")
        self.python = os.path.join(self.bin, "python")
        self.work = str(folder / "work")
        # Nothing of the checkout's environment: no PYTHONPATH, no VIRTUAL_ENV, the fresh venv first on PATH.
        self.env = {"PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
                    "TF_CPP_MIN_LOG_LEVEL": "2", "LANG": "C.UTF-8"}
        for name in ("DISTCLIP_CACHE", "PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_INDEX_URL",
                     "PIP_EXTRA_INDEX_URL"):
            if name in os.environ:
                self.env[name] = os.environ[name]

    def run(self, *cmd, timeout=300) -> subprocess.CompletedProcess:
        return _run(list(cmd), self.env, self.work, timeout)

    def pip(self, *args) -> None:
        r = self.run(self.python, "-m", "pip", "--disable-pip-version-check", "-q", *args, timeout=600)
        assert r.returncode == 0, _out(r)

    def installed(self) -> set:
        r = self.run(self.python, "-m", "pip", "list", "--format=freeze")
        assert r.returncode == 0, _out(r)
        return {line.split("==")[0].lower().replace("_", "-") for line in r.stdout.split()}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """The sdist and the wheel, built by `python -m build` from the checkout (setuptools from the build's
    own isolated environment, as for a release), and checked by `twine check`."""
    out = tmp_path_factory.mktemp("dist")
    r = _run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), ROOT],
             dict(os.environ), ROOT, timeout=600)
    assert r.returncode == 0, _out(r)
    files = sorted(glob.glob(str(out / "*")))
    assert [os.path.basename(f).split("-")[0] for f in files] == ["distclip", "distclip"], files
    r = _run([sys.executable, "-m", "twine", "check", "--strict", *files], dict(os.environ), ROOT)
    assert r.returncode == 0 and r.stdout.count("PASSED") == 2, _out(r)
    return {"wheel": next(f for f in files if f.endswith(".whl")),
            "sdist": next(f for f in files if f.endswith(".tar.gz"))}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, dist) -> Env:
    """A new virtual environment with the tested TensorFlow set, then the wheel; checked to hold none of the
    optional packages, before any test can add one."""
    env = Env(tmp_path_factory.mktemp("fresh"))
    r = _run([sys.executable, "-m", "venv", env.venv], env.env, ROOT)
    assert r.returncode == 0, _out(r)
    os.makedirs(env.work)
    env.pip("install", "-c", CONSTRAINTS, *TENSORFLOW_SET)
    before = env.installed()
    env.pip("install", "-c", CONSTRAINTS, dist["wheel"])
    added = env.installed() - before
    assert added == {"distclip"}, f"installing the wheel added {sorted(added)} to the TensorFlow set"
    assert not OPTIONAL & env.installed(), sorted(OPTIONAL & env.installed())
    for name in glob.glob(os.path.join(EXAMPLES, "*.py")):
        shutil.copy(name, env.work)
    return env


def test_every_example_is_run_here():
    ran = set(SINGLE_PROCESS) | {"multi_worker.py", "tensorboard_norm.py", "horovod_loop.py"}
    assert {os.path.basename(f) for f in glob.glob(os.path.join(EXAMPLES, "*.py"))} == ran


def test_wheel_holds_the_library_only_with_its_metadata(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = whl.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(whl.read(info).decode())
    outside = [n for n in names if not n.startswith(("distclip/", "distclip-"))]
    assert not outside, outside
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "distclip/py.typed" in names and "distclip/_src/clip.py" in names and "distclip/train/cli.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)

    import distclip

    assert metadata["Name"] == "distclip" and metadata["Version"] == distclip.__version__
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["License-Expression"] == "Apache-2.0"
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert set(urls) >= {"Documentation", "Source", "Issues", "Changelog"}, urls
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")
    # Horovod is no extra: pip cannot build it against TensorFlow 2.19 and later (scripts/install-horovod.sh can).
    assert sorted(metadata.get_all("Provides-Extra")) == ["dev", "docs", "mpi", "tf", "tf-cpu", "train"]
    requires = metadata.get_all("Requires-Dist")
    # Nothing beyond Keras and NumPy unless an extra asks; TensorFlow only through an extra (it has several names).
    assert sorted(r.split(">")[0].split("<")[0] for r in requires if "extra ==" not in r) == ["keras", "numpy"]
    packaged = {n for n in names if n.startswith("distclip/") and n.endswith(".py")}
    in_checkout = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "distclip", "**", "*.py"),
                                                                recursive=True)}
    assert packaged == in_checkout, sorted(packaged ^ in_checkout)


def test_sdist_builds_the_same_wheel_contents(dist, tmp_path):
    """The sdist is complete: a wheel built from it holds the same files as the one built from the checkout,
    and it carries what the wheel leaves out for users who build from source (install-horovod.sh and its patch,
    the examples, the launch scripts and sbatch templates)."""
    import tarfile

    with tarfile.open(dist["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    wanted = {"scripts/install-horovod.sh", "scripts/horovod-0.28.1-tf2.19.patch", "launch/horovodrun.sh",
              "slurm/horovod-srun.sbatch", "CHANGELOG.md", "LICENSE"}
    wanted |= {os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(EXAMPLES, "*.py"))}
    assert wanted <= names, sorted(wanted - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), dist["sdist"]],
             dict(os.environ), str(tmp_path), timeout=600)
    assert r.returncode == 0, _out(r)
    (rebuilt,) = glob.glob(str(tmp_path / "*.whl"))
    with zipfile.ZipFile(rebuilt) as a, zipfile.ZipFile(dist["wheel"]) as b:
        assert sorted(a.namelist()) == sorted(b.namelist())


def test_imports_without_optional_packages_and_says_what_to_install(fresh):
    check = """
import os, sys, distclip, distclip.keras, distclip.cluster
assert distclip.__file__.startswith(sys.prefix), distclip.__file__
for module in (distclip, distclip.keras, distclip.cluster):
    for name in module.__all__:
        getattr(module, name)
assert not {"horovod", "mpi4py", "matplotlib", "tensorboard"} & set(sys.modules), sorted(sys.modules)
try:
    distclip.keras.ClipLogger("logs")
except distclip.ContextError as e:
    print("ClipLogger:", e)
import tensorflow as tf
try:
    distclip.ClipStep(tf.keras.optimizers.SGD(0.1), clip_norm=1.0, backend="horovod").apply(
        [tf.ones(2)], [tf.Variable(tf.zeros(2))])
except distclip.ContextError as e:
    print("horovod:", e)
"""
    r = fresh.run(fresh.python, "-c", check)
    assert r.returncode == 0, _out(r)
    assert "ClipLogger: ClipLogger(log_dir='logs') writes TensorBoard event files" in r.stdout, _out(r)
    assert "pip install tensorboard" in r.stdout, _out(r)
    assert "horovod: backend='horovod' needs Horovod" in r.stdout and "install-horovod.sh" in r.stdout, _out(r)
    r = fresh.run(os.path.join(fresh.bin, "distclip"), "train", "--steps", "1")
    assert r.returncode != 0 and "pip install 'distclip[train]'" in r.stderr, _out(r)
    assert "matplotlib and tensorboard" in r.stderr, _out(r)


@pytest.mark.parametrize("example", sorted(SINGLE_PROCESS))
def test_example_runs_in_the_fresh_environment(fresh, example):
    r = fresh.run(fresh.python, example, timeout=240)
    assert r.returncode == 0, _out(r)
    assert SINGLE_PROCESS[example] in r.stdout, _out(r)


def test_multi_worker_example_with_the_local_launcher(fresh):
    r = fresh.run(fresh.python, "-m", "distclip.cluster.launcher", "--nproc", "2", "--timeout", "240", "--",
                  "python", "multi_worker.py", timeout=300)
    assert r.returncode == 0, _out(r)
    assert r.stdout.count("replicas identical") == 2 and "worker 0 of 2" in r.stdout and "worker 1 of 2" in r.stdout


def test_tensorboard_example_once_tensorboard_is_installed(fresh):
    fresh.pip("install", "-c", CONSTRAINTS, "tensorboard")
    r = fresh.run(fresh.python, "tensorboard_norm.py", os.path.join(fresh.work, "tb"), timeout=240)
    assert r.returncode == 0, _out(r)
    assert "16 steps of global_norm" in r.stdout, _out(r)


def test_install_horovod_builds_for_this_environment_and_the_horovod_example_runs(fresh):
    """scripts/install-horovod.sh against the fresh environment's TensorFlow (the wheel setup.sh cached for the
    same TensorFlow and Python is reused), then `horovodrun -np 2` of the Horovod example."""
    r = fresh.run("bash", os.path.join(ROOT, "scripts", "install-horovod.sh"), fresh.python, timeout=1200)
    assert r.returncode == 0, _out(r)
    assert f"installed for tensorflow-cpu {TF_VERSION} ({fresh.python})" in r.stderr, _out(r)
    r = fresh.run(os.path.join(fresh.bin, "horovodrun"), "-np", "2", "--gloo", "python", "horovod_loop.py",
                  timeout=300)
    assert r.returncode == 0, _out(r)
    assert "2 ranks, 20 steps: the same global norm on every rank" in r.stdout, _out(r)
