"""The documentation site builds with warnings as errors, and its check of the public docstrings finds gaps."""
import os
import subprocess
import sys
import textwrap

from procs import ROOT, require

sys.path.insert(0, os.path.join(ROOT, "docs", "hooks"))
import public_api  # noqa: E402


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`, the README's command: broken links, unresolved references, and the hook's
    findings (public names without docstrings or with undocumented arguments) would each fail it."""
    require(modules=["mkdocs", "mkdocstrings", "material"])
    mkdocs = os.path.join(os.path.dirname(sys.executable), "mkdocs")
    r = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, r.stderr[-4000:]
    api = (tmp_path / "site" / "api" / "distclip" / "index.html").read_text()
    # The reference is generated from the code: ClipStep's signature and one of its documented arguments.
    assert "distclip.ClipStep" in api and "accumulation_steps" in api and "bucket_mb" in api
    # The examples page includes the scripts themselves (a docstring line of examples/custom_loop.py).
    examples = (tmp_path / "site" / "examples" / "index.html").read_text()
    assert "clips them by the global norm of the synchronized gradients" in examples


def test_every_public_name_is_documented():
    assert public_api.check() == []


def test_docstring_check_finds_each_kind_of_gap(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        __all__ = ["documented", "bare", "partial", "no_returns", "Thing", "missing"]


        def documented(a: int) -> int:
            """Doubles.

            Args:
              a: a number.

            Returns:
              2a.
            """
            return 2 * a


        def bare(a: int) -> None:
            pass


        def partial(a: int, b: int) -> None:
            """Adds.

            Args:
              a: a number.
            """


        def no_returns() -> int:
            """One."""
            return 1


        class Thing:
            """A thing.

            Args:
              size: its size.
            """

            def __init__(self, size: int, colour: str) -> None:
                self.size = size

            def grow(self) -> None:
                pass
    '''))
    assert public_api.check(str(tmp_path), ("pkg",)) == [
        "pkg.bare: no docstring",
        "pkg.partial: Args does not document b",
        "pkg.no_returns: no Returns section (it returns int)",
        "pkg.Thing: Args does not document colour",
        "pkg.Thing.grow: no docstring",
        "pkg.missing: exported but not defined",
    ]


def test_every_repository_path_the_docs_name_exists():
    """A path in backquotes (`tests/unit/test_optimizer.py`, `scripts/install-horovod.sh`) in the README, the
    changelog or a page of the site names a file or folder of this repository."""
    import glob
    import re

    pages = ["README.md", "CHANGELOG.md", "launch/README.md", "slurm/README.md"]
    pages += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)]
    pattern = re.compile(r"`((?:distclip|tests|benchmarks|launch|slurm|scripts|examples|docs)/[\w./-]*)")
    missing = [(page, path) for page in pages for path in pattern.findall(open(os.path.join(ROOT, page)).read())
               if not os.path.exists(os.path.join(ROOT, path.rstrip(".")))]
    assert not missing, missing
