"""The floor plan holds: every import points down the layers of docs/architecture.md, with no circle.

The imports are read with ``ast`` from the source (nothing is imported), including the deferred
ones inside functions and the type-only ones under ``if TYPE_CHECKING:``: a circle hides behind
either, and a type-only import is still a dependency of the design. The layer table below is the
one docs/architecture.md explains; a new module must be placed in it, so its layer is a
decision, not an accident. Each layer's bans on third-party libraries (no Lightning, Hydra or
OmegaConf below the callbacks; no configs below the training plumbing) hold for every module of
the layer, and the two model families never import each other.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onedc"

CONFIG_LIBRARIES = ("hydra", "omegaconf")
TRAINING_LIBRARIES = ("lightning", "hydra", "omegaconf")
# Lowest first: (name, module prefixes, third-party libraries every module of the layer must not
# import). A module may import its own layer and the ones below it, never one above.
LAYERS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("base", ("onedc", "onedc.errors", "onedc.io", "onedc.samples", "onedc.progress"), TRAINING_LIBRARIES),
    # the coding product's plain-data formats: image files, the .onedc container, weight files
    # onedc.assets: the packaged weights files and their asset:NAME paths (data, no training code)
    ("files", ("onedc.coding.images", "onedc.coding.bitstream", "onedc.coding.checkpoints", "onedc.coding.folders",
               "onedc.assets"), TRAINING_LIBRARIES),
    ("shared modules", ("onedc.modules",), TRAINING_LIBRARIES),
    ("family modules", ("onedc.modules.light", "onedc.modules.reference"), TRAINING_LIBRARIES),
    ("families", ("onedc.families",), TRAINING_LIBRARIES),
    ("coding", ("onedc.coding", "onedc.inference"), TRAINING_LIBRARIES),
    ("evaluation", ("onedc.eval",), TRAINING_LIBRARIES),
    # the offline recipes that make the packaged weights (photos -> trained VAE and teacher)
    ("quick-train recipes", ("onedc.quicktrain",), TRAINING_LIBRARIES),
    ("callbacks+data", ("onedc.callbacks", "onedc.datamodules"), CONFIG_LIBRARIES),
    ("stages", ("onedc.stages",), CONFIG_LIBRARIES),
    ("training", ("onedc.training",), ()),
    ("entry points", ("onedc.cli", "train", "onedc.assets.make"), ()),
)
# Packages of one layer that must not import each other: each model family stands alone.
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("onedc.modules.light", "onedc.modules.reference", "onedc.families.light", "onedc.families.reference"),
)
# Imports a layer's ban allows, each with its reason.
ALLOWED = {
    # converting a DeepSpeed checkpoint folder needs Lightning's tool (deferred: only for folders)
    ("onedc.coding.checkpoints", "lightning.pytorch.utilities.deepspeed"),
}
# The public alias modules, for users only: nothing in the package imports them.
PUBLIC_ALIASES = ("onedc.inference",)
# What the coding path (onedc compress / decompress / info) must never load.
TRAINING_ONLY = TRAINING_LIBRARIES


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module`` (KeyError if none does)."""
    best = None
    for rank, (_, prefixes, _) in enumerate(LAYERS):
        for prefix in prefixes:
            # The package itself ("onedc") names only its __init__, not everything below it.
            inside = module.startswith(prefix + ".") and prefix != "onedc"
            if (module == prefix or inside) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    if best is None:
        raise KeyError(module)
    return best[0]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(package: Path = PACKAGE) -> list[Path]:
    extra = [package.parent / "train.py"] if (package.parent / "train.py").exists() else []
    return sorted(package.rglob("*.py")) + extra


MODULES = {module_name(p) for p in source_files()}


def _parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def imports(path: Path, root: Path = ROOT, modules: set[str] | None = None) -> list[tuple[int, str]]:
    """(line, imported onedc module) of every import in ``path``: deferred and type-only ones included.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module of onedc,
    else ``pkg``; relative imports are resolved against ``path``'s package.
    """
    modules = MODULES if modules is None else modules
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in modules else base))
    return [(line, name) for line, name in found if name == "onedc" or name.startswith("onedc.")]


def third_party_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every non-onedc import of ``path`` (deferred and type-only ones included)."""
    found = []
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if not name.startswith("onedc")]


def graph_of(files: list[Path], root: Path) -> dict[str, set[str]]:
    """Module -> the onedc modules it imports. Importing a package's submodule runs the package's
    ``__init__`` too, but that is the package's own business: only the named module is an edge."""
    modules = {module_name(p, root) for p in files}
    edges: dict[str, set[str]] = {}
    for path in files:
        own = module_name(path, root)
        edges[own] = {name for _, name in imports(path, root, modules) if name in modules and name != own}
    return edges


@functools.lru_cache(maxsize=1)
def graph() -> dict[str, set[str]]:
    return graph_of(source_files(), ROOT)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``edges`` (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


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
    assert not circles(graph()), f"import circles: {circles(graph())}"


def test_the_model_families_do_not_import_each_other():
    crossing = []
    for group in SIBLINGS:
        for path in source_files():
            own = module_name(path)
            mine = next((g for g in group if own == g or own.startswith(g + ".")), None)
            if mine is None:
                continue
            family = mine.rsplit(".", 1)[1]
            for line, name in imports(path):
                other = next((g for g in group if name == g or name.startswith(g + ".")), None)
                if other is not None and other.rsplit(".", 1)[1] != family:
                    crossing.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not crossing, "one family imports the other:\n" + "\n".join(crossing)


def test_every_module_keeps_its_layers_bans():
    offenders = []
    for path in source_files():
        own = module_name(path)
        name, _, banned = LAYERS[layer_of(own)]
        for line, imported in third_party_imports(path):
            if imported.split(".")[0] in banned and (own, imported) not in ALLOWED:
                offenders.append(f"{path.relative_to(ROOT)}:{line} ({name}) imports {imported}")
    assert not offenders, "layer bans broken:\n" + "\n".join(offenders)


def test_nothing_in_the_package_imports_a_public_alias():
    users = [f"{module} imports {alias}" for module, targets in graph().items() for alias in PUBLIC_ALIASES
             if alias in targets]
    assert not users, users


def _package(tmp_path: Path, files: dict[str, str]) -> tuple[list[Path], Path]:
    for name, text in files.items():
        target = tmp_path / "onedc" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return sorted((tmp_path / "onedc").rglob("*.py")), tmp_path


def test_the_circle_check_sees_type_only_deferred_and_relative_imports(tmp_path):
    # The shape of the old rate <-> inference circle: one side imports the other only for typing.
    files, root = _package(tmp_path, {
        "__init__.py": "",
        "rate.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from onedc.inference import Codec\n",
        "inference.py": "def table():\n    from .rate import rate_table\n",
        "other.py": "import onedc.rate\n",
    })
    edges = graph_of(files, root)
    assert edges["onedc.rate"] == {"onedc.inference"} and edges["onedc.inference"] == {"onedc.rate"}
    assert circles(edges) == [["onedc.inference", "onedc.rate"]]


@pytest.mark.parametrize("module", ["onedc.cli", "onedc.coding.bundle", "onedc.coding.export", "onedc.coding.images",
                                    "onedc.coding.checkpoints", "onedc.coding.rate"])
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
        offenders += [f"{name} imports {n}" for _, n in third_party_imports(path)
                      if n.split(".")[0] in TRAINING_ONLY and (name, n) not in ALLOWED]
    assert not offenders, offenders
