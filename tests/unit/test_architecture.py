"""The shape of the house, enforced: what may import what (ARCHITECTURE.md), no cycle, one result convention.

Every module's imports are read with ``ast`` (imports inside functions included) and each edge between two
mechscope modules is checked against the rule:

* ``core`` imports only ``core``;
* ``cnn`` and ``lm`` import ``core`` and never each other; only the root ``__init__``, ``__main__`` and ``cli`` see
  both — and ``clip``, the image–text room built from both wings (a CLIP model is a vision transformer and a
  text transformer, studied with the CNN half's image tools), which nothing but the root imports;
* inside a wing: data/models (0) → methods (1) → report (2) → notebook (3) → pipelines (4) → cli (5), each
  importing only its own layer or those to its left; the wing's ``__init__`` (its facade) sits above them all;
* methods (of a wing, and core's techniques) never import rendering (``core.render``, ``core.show``);
* and there is no import cycle anywhere.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import mechscope
from mechscope.core.results import Result

PKG = Path(mechscope.__file__).parent
WINGS = ("cnn", "lm", "clip")
ABOVE_THE_WINGS = ("clip",)  # rooms that may import the two wings (and are imported by the root only)
LAYERS = {  # a wing module's layer, by the first part of its path inside the wing
    "data": 0, "models": 0, "config": 0, "runs": 0, "training": 0, "tokenizer": 0, "text": 0,
    "methods": 1, "toy": 1,
    "report": 2,
    "notebook": 3,
    "pipelines": 4,
    "cli": 5,
}  # fmt: skip
FACADE = 6
RENDERING = ("mechscope.core.render", "mechscope.core.show")
CORE_TECHNIQUES = ("mechscope.core.dictionaries", "mechscope.core.graphs", "mechscope.core.scrub",
                   "mechscope.core.intervene")  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports_of(name: str, path: Path) -> set[str]:
    """The mechscope modules ``name`` imports, anywhere in its body, resolved to modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mechscope")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("mechscope"):
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                out.add(full if full in MODULES else module)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def where(name: str) -> tuple[str, int | None]:
    """(part of the house, layer inside a wing or None)."""
    parts = name.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "__main__"):
        return "root", None
    if parts[1] == "core":
        return "core", None
    if parts[1] in WINGS:
        return parts[1], FACADE if len(parts) == 2 else LAYERS.get(parts[2])
    return "outside", None


def test_every_module_lives_in_a_room():
    outside = [n for n in MODULES if where(n)[0] == "outside"]
    assert outside == [], f"modules outside core/, cnn/, lm/: {outside}"
    unplaced = [n for n in MODULES if where(n)[0] in WINGS and where(n)[1] is None]
    assert unplaced == [], f"wing modules with no layer (add them to LAYERS): {unplaced}"


def forbidden(source: str, target: str) -> str | None:
    """Why the edge source -> target breaks the rule (None: allowed)."""
    (a, la), (b, lb) = where(source), where(target)
    if a == "root":
        return None
    if a == "core" and b != "core":
        return "core imports only core"
    if a in WINGS and b in WINGS and a != b and a not in ABOVE_THE_WINGS:
        return "the wings never import each other"
    if b in ABOVE_THE_WINGS and a not in (b, "root"):
        return f"only the root imports {b}"
    if a in WINGS and b == a and lb > la:
        return f"layer {la} imports layer {lb} (only leftwards)"
    if target.startswith(RENDERING) and (
        (a in WINGS and la <= LAYERS["methods"]) or source.startswith(CORE_TECHNIQUES)
    ):
        return "methods never import rendering"
    return None


def test_the_import_rule():
    broken = [f"{s} -> {t}: {why}" for s, targets in GRAPH.items() for t in targets if (why := forbidden(s, t))]
    assert broken == [], "\n".join(broken)


def test_no_import_cycle():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("rule", ["core->cnn", "cnn->lm", "methods->report", "methods->render", "cycle"])
def test_the_rule_catches_what_it_should(rule):
    # the checker itself, on edges it must refuse (so that a passing rule test means something)
    if rule == "cycle":
        saved = dict(GRAPH)
        try:
            GRAPH["mechscope.core.errors"] = {"mechscope.core.results"}
            with pytest.raises(AssertionError):
                test_no_import_cycle()
        finally:
            GRAPH.clear()
            GRAPH.update(saved)
        return
    edge = {
        "core->cnn": ("mechscope.core.results", "mechscope.cnn.methods.featvis"),
        "cnn->lm": ("mechscope.cnn.methods.featvis", "mechscope.lm.models.transformer"),
        "methods->report": ("mechscope.lm.methods.heads", "mechscope.lm.report.heads"),
        "methods->render": ("mechscope.lm.methods.heads", "mechscope.core.show"),
    }[rule]
    assert forbidden(*edge)


def result_classes() -> list[type]:
    found = {}
    for m in pkgutil.walk_packages(mechscope.__path__, "mechscope."):
        module = importlib.import_module(m.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Result) and cls is not Result and cls.__module__ == m.name:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(found.values())


def test_every_result_is_a_frozen_dataclass():
    classes = result_classes()
    assert len(classes) > 40
    loose = [c.__qualname__ for c in classes if not (dataclasses.is_dataclass(c) and c.__dataclass_params__.frozen)]
    assert loose == []


def test_no_result_is_changed_after_construction():
    # object.__setattr__ is how a frozen dataclass is changed behind its back; it may appear only where an
    # object is being built (__post_init__)
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and fn.name != "__post_init__":
                for node in ast.walk(fn):
                    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                            and node.func.attr == "__setattr__"):  # fmt: skip
                        found.append(f"{name}.{fn.name}")
    assert found == []


def test_schemas_are_one_header_each():
    schemas = [c.SCHEMA for c in result_classes() if c.SCHEMA]
    assert all(s.startswith("mechscope.") and "/" in s for s in schemas)
    assert len(schemas) == len(set(schemas))
