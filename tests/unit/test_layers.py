"""The package's layers, read from every import in distclip/ (function-level ones included).

    core      distclip, distclip._src.* (the step: norm, thresholds, policies, accumulation, the update,
              step log) and distclip._src.sync.* (one backend per way of keeping replicas identical)
    keras     distclip.keras, distclip._src.keras.*      imports core
    cluster   distclip.cluster.*    imports core (launcher, watchdog, netns: nothing heavier than env)
    app       distclip.train.*      the example application: imports anything, imported by nothing
              (but `python -m distclip`, distclip/__main__.py, which starts it)

No circle among modules, and no import from a lower layer to a higher one.
"""
import ast
import os

import distclip

PACKAGE = os.path.dirname(distclip.__file__)
RANK = {"core": 0, "keras": 1, "cluster": 1, "app": 2}
#: What each layer may import besides itself and lower layers.
ALLOWED = {"keras": {"core"}, "cluster": {"core"}, "core": set(), "app": {"core", "keras", "cluster"}}


def _modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                found[name[:-9] if name.endswith(".__init__") else name] = path
    return found


def _imports(path, modules):
    """The distclip modules `path` imports (a `from package import name` of a submodule counts as that module)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("distclip")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distclip"):
            for a in node.names:
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
    return {m for m in out if m in modules}


def layer(module):
    parts = module.split(".")
    if parts[1:2] == ["_src"]:
        parts = parts[1:]
    return {"keras": "keras", "cluster": "cluster", "train": "app"}.get(parts[1] if len(parts) > 1 else "", "core")


def _graph():
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_no_import_goes_up_or_sideways():
    wrong = []
    for module, imported in _graph().items():
        if module in ("distclip", "distclip.__main__"):
            continue  # the package's lazy exports, the `python -m distclip` entry point
        for other in imported:
            a, b = layer(module), layer(other)
            if a != b and b not in ALLOWED[a]:
                wrong.append(f"{module} ({a}) imports {other} ({b})")
    assert not wrong, wrong


#: What the example application may import from the library: its public packages (the names they export).
PUBLIC = {"distclip", "distclip.keras", "distclip.cluster"}


def test_the_application_uses_only_the_public_api():
    """distclip/train/ is the first code users copy: it imports `distclip`, `distclip.keras` and
    `distclip.cluster`, never `distclip._src` nor a module inside those packages."""
    wrong = [f"{module} imports {other}" for module, imported in _graph().items() if layer(module) == "app"
             for other in imported if layer(other) != "app" and other not in PUBLIC]
    assert not wrong, wrong
    loop = _graph()["distclip.train.loop"]
    assert "distclip" in loop and not any(m.startswith("distclip._src") for m in loop)


def test_no_import_circle():
    graph = _graph()
    state, circles = {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                circles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_the_check_sees_the_imports_it_judges():
    graph = _graph()
    # Guards against a check that passes on an empty or unresolved graph.
    assert "distclip._src.clip" in graph["distclip._src.update"] and "distclip._src.sync" in graph["distclip._src.clip"]
    assert "distclip._src.keras.optimizer" in graph["distclip.keras"] and layer("distclip._src.keras.optimizer") == "keras"
    assert "distclip._src.reporter" in graph["distclip._src.keras.callbacks"]
    assert "distclip._src.steplog" in graph["distclip._src.reporter"]
    assert "distclip.train.summary" in graph["distclip.train.loop"]
    assert layer("distclip._src.sync.horovod") == "core" and layer("distclip.train.cli") == "app"
