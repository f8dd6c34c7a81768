"""An mkdocs hook: every public name has a docstring that documents its arguments, in one style (Google).

The public names are what `distclip`, `distclip.keras` and `distclip.cluster` export. For each, read from the
source by griffe (what mkdocstrings renders; nothing imports TensorFlow): a docstring; an Args section naming
every parameter of the signature (a class's `__init__`'s, in the class docstring); a Returns section for a
function that returns something. Public methods defined on a public class need a docstring too. Each gap is
a warning, which `mkdocs build --strict` turns into a failed build.
"""
from __future__ import annotations

import ast
import logging
import os

import griffe

log = logging.getLogger("mkdocs.hooks.public_api")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("distclip", "distclip.keras", "distclip.cluster")


def _exports(module: griffe.Module) -> list[str]:
    if module.exports:
        return [str(e) for e in module.exports]
    # distclip's own __all__ is built from _EXPORTS, which names are loaded on first use.
    return list(ast.literal_eval(str(module["_EXPORTS"].value)))


def _sections(obj: griffe.Object) -> dict:
    sections: dict = {}
    if obj.docstring:
        for section in obj.docstring.parse("google"):
            sections.setdefault(section.kind.value, []).append(section)
    return sections


def _documented(sections: dict) -> set[str]:
    return {p.name.lstrip("*") for s in sections.get("parameters", []) for p in s.value}


def _check_signature(where: str, function: griffe.Function, sections: dict) -> list[str]:
    problems = []
    wanted = [p.name for p in function.parameters if p.name not in ("self", "cls")]
    missing = [name for name in wanted if name not in _documented(sections)]
    if missing:
        problems.append(f"{where}: Args does not document {', '.join(missing)}")
    returns = function.returns
    if (function.name != "__init__" and returns is not None and str(returns) not in ("None", "NoReturn")
            and "returns" not in sections and not function.has_labels("property")):
        problems.append(f"{where}: no Returns section (it returns {returns})")
    return problems


def check(root: str = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """The gaps in the public names' docstrings, one line each (none: all documented).

    Args:
      root: the folder that holds the packages.
      packages: the packages whose exports are public.

    Returns:
      One "name: problem" line per gap.
    """
    loader = griffe.GriffeLoader(search_paths=[root], docstring_parser=griffe.Parser("google"))
    problems = []
    for package in packages:
        module = loader.load(package)
        loader.resolve_aliases(implicit=True, external=False)
        for name in _exports(module):
            if name not in module.members:
                problems.append(f"{package}.{name}: exported but not defined")
                continue
            where = f"{package}.{name}"
            obj = module[name].final_target if module[name].is_alias else module[name]
            if not obj.docstring or not obj.docstring.value.strip():
                problems.append(f"{where}: no docstring")
                continue
            sections = _sections(obj)
            if obj.is_function:
                problems += _check_signature(where, obj, sections)
            elif obj.is_class:
                init = obj.all_members.get("__init__")  # its own or inherited (ClipStep's is StepBase's)
                if init is not None and init.is_function:
                    problems += _check_signature(where, init, sections | _sections(init))
                for member in obj.members.values():
                    if member.name.startswith("_") or member.is_alias or not (member.is_function or member.is_class):
                        continue
                    if not member.docstring or not member.docstring.value.strip():
                        problems.append(f"{where}.{member.name}: no docstring")
                    elif member.is_function and not member.has_labels("property"):
                        problems += _check_signature(f"{where}.{member.name}", member, _sections(member))
    return problems


def on_pre_build(config, **kwargs) -> None:
    for problem in check():
        log.warning(problem)


if __name__ == "__main__":
    for line in check():
        print(line)
