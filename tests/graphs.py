"""What a traced step sends through collectives, read from its graph and every function nested in it."""
from __future__ import annotations

from typing import List, Tuple

COLLECTIVE = "CollectiveReduceV2"


def collectives(graph, depth: int = 0, seen=None) -> List[Tuple[int, int]]:
    """(elements, nesting depth) of every CollectiveReduceV2 in `graph` and the functions it calls
    (Keras's nested `one_step_on_data`, tf.cond branches, ...); depth 0 is `graph` itself."""
    seen = set() if seen is None else seen
    found = [(op.inputs[0].shape.num_elements(), depth) for op in graph.get_operations() if op.type == COLLECTIVE]
    for name, function in getattr(graph, "_functions", {}).items():
        if name in seen:
            continue
        seen.add(name)
        nested = getattr(function, "graph", None)
        assert nested is not None, f"cannot read the graph of nested function {name}"
        found += collectives(nested, depth + 1, seen)
    return found


def op_types(graph, seen=None) -> List[str]:
    """The type of every op in `graph` and in every function nested in it."""
    seen = set() if seen is None else seen
    found = [op.type for op in graph.get_operations()]
    for name, function in getattr(graph, "_functions", {}).items():
        if name not in seen:
            seen.add(name)
            found += op_types(function.graph, seen)
    return found


#: Ops that stop the device for the host: Python callbacks, printing, host-side assertions.
HOST_ROUND_TRIPS = ("PyFunc", "PyFuncStateless", "EagerPyFunc", "Print", "PrintV2", "Assert")


def host_round_trips(graph) -> List[str]:
    """The HOST_ROUND_TRIPS types among the ops of `graph` and the functions nested in it, sorted; [] for none."""
    return sorted(set(op_types(graph)) & set(HOST_ROUND_TRIPS))


def reduced_elements(concrete) -> Tuple[int, int, int]:
    """(elements through CollectiveReduceV2 at the top of the step's graph, how many such ops there,
    elements in nested functions)."""
    found = collectives(concrete.graph)
    top = [n for n, depth in found if depth == 0]
    return sum(top), len(top), sum(n for n, depth in found if depth > 0)


def fit_collectives(model) -> List[Tuple[int, int]]:
    """`collectives` of everything `fit` traced for `model` (Keras's train function and what it calls)."""
    return [c for f in _fit_functions(model) for c in collectives(f.graph)]


def _fit_functions(model):
    """The concrete functions of Keras's train function (the tf.function(s) `make_train_function` closes over)."""
    traced = [c.cell_contents for c in model.train_function.__closure__
              if hasattr(c.cell_contents, "_list_all_concrete_functions")]
    assert traced
    return [f for t in traced for f in t._list_all_concrete_functions()]


def fit_xla_functions(model) -> List[str]:
    """Names of the functions `fit` traced that TensorFlow must compile with XLA (`_XlaMustCompile`)."""
    names = []

    def walk(graph):
        for name, function in getattr(graph, "_functions", {}).items():
            attr = function.definition.attr.get("_XlaMustCompile")
            if attr is not None and attr.b:
                names.append(name)
            walk(function.graph)

    for concrete in _fit_functions(model):
        attr = concrete.function_def.attr.get("_XlaMustCompile")
        if attr is not None and attr.b:
            names.append(concrete.name)
        walk(concrete.graph)
    return names
