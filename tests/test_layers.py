"""The floor plan holds: every import points down the layers of docs/architecture.md, with no circle.

The imports are read with ``ast`` from the source (nothing is imported), including the deferred
ones inside functions, which are the ones a circle hides behind. ``if TYPE_CHECKING:`` blocks are
skipped: they never run. The layer table below is the one docs/architecture.md explains; a new
module must be placed in it, so its layer is a decision, not an accident.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onedc"

# Lowest first. A module may import its own layer and the ones below it, never one above.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("onedc", "onedc.errors", "onedc.io", "onedc.images", "onedc.samples", "onedc.progress")),
    # onedc.assets: the packaged weights files and their asset:NAME paths (data, no training code).
    ("checkpoints+spec", ("onedc.checkpoints", "onedc.model_spec", "onedc.assets")),
    ("modules", ("onedc.modules",)),
    ("coding", ("onedc.bitstream", "onedc.model_identity", "onedc.inference", "onedc.rate", "onedc.export",
                "onedc.reference_import")),
    ("evaluation", ("onedc.eval", "onedc.evaluation")),
    # onedc.report (the end-of-chain report) reads photos through onedc.datamodules; with
    # onedc.images it would sit in the evaluation layer.
    # onedc.quicktrain: the offline recipes of the packaged weights (photos -> trained modules).
    ("callbacks+data", ("onedc.callbacks", "onedc.datamodules", "onedc.report", "onedc.quicktrain")),
    ("stages", ("onedc.stages",)),
    ("build", ("onedc.config", "onedc.build")),
    ("pipeline", ("onedc.pipeline",)),
    ("entry points", ("onedc.cli", "train", "onedc.assets.make")),
)
# What the coding path (onedc compress / decompress / info) must never load.
TRAINING_ONLY = ("lightning", "hydra", "omegaconf")


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module`` (KeyError if none does)."""
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # The package itself ("onedc") names only its __init__, not everything below it.
            inside = module.startswith(prefix + ".") and prefix != "onedc"
            if (module == prefix or inside) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    if best is None:
        raise KeyError(module)
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py")) + [ROOT / "train.py"]


MODULES = {module_name(p) for p in source_files()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported onedc module) of every import in ``path`` that runs, deferred ones included.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module of onedc,
    else ``pkg``; relative imports are resolved against ``path``'s package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
               for child in node.body for n in ast.walk(child)}
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in MODULES else base))
    return [(line, name) for line, name in found if name == "onedc" or name.startswith("onedc.")]


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in source_files():
        own = module_name(path)
        # Importing a package's submodule runs the package's __init__ too, but that is the
        # package's own business: only the named module is an edge.
        edges[own] = {name for _, name in imports(path) if name in MODULES and name != own}
    return edges


def test_every_module_has_a_layer():
    unplaced = []
    for module in sorted(MODULES):
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py and docs/architecture.md: {unplaced}"


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in source_files():
        own = module_name(path)
        for line, name in imports(path):
            if name == "onedc":
                continue
            if layer_of(name) > layer_of(own):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[layer_of(own)][0]}) imports {name} "
                              f"({LAYERS[layer_of(name)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_there_is_no_import_circle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_layer_check_sees_deferred_and_relative_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import onedc.pipeline\n"
                      "def later():\n    from onedc.build import build_stage\n    import onedc.stages.common\n")
    assert [name for _, name in imports_of(sample)] == ["onedc.build", "onedc.stages.common"]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """:func:`imports` for a file outside the package (resolved as a top-level module)."""
    fake = PACKAGE / path.name
    try:
        fake.write_text(path.read_text())
        return imports(fake)
    finally:
        fake.unlink()


@pytest.mark.parametrize("module", ["onedc.cli", "onedc.inference", "onedc.export", "onedc.images",
                                    "onedc.checkpoints", "onedc.rate"])
def test_coding_modules_reach_no_training_library(module):
    """Every onedc module the coding path can reach, deferred imports included, imports none of
    Lightning, Hydra or OmegaConf (the compress subprocess test checks sys.modules too)."""
    edges = graph()
    reach, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in reach:
            continue
        reach.add(current)
        # The CLI dispatches to every subcommand; eval and import-reference are not coding.
        todo += [n for n in edges.get(current, ()) if not (current == "onedc.cli" and layer_of(n) >= layer_of("onedc.eval"))]
    offenders = []
    for name in sorted(reach):
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        path = path if path.exists() else PACKAGE.parent / name.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {n}" for n in names if n.split(".")[0] in TRAINING_ONLY]
    # The one allowed exception: converting a DeepSpeed checkpoint folder needs Lightning's tool.
    offenders = [o for o in offenders if o != "onedc.checkpoints imports lightning.pytorch.utilities.deepspeed"]
    assert not offenders, offenders
