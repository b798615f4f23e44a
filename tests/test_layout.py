"""The code's shape, read from its imports: which part of ``pipeline`` may import which, stated once here.

``pipeline/`` holds one subpackage per stage of the path the data takes, and a handful of
cross-cutting modules at the top (errors, atomic writes, hashing, device and dtype names, metrics):

    files -> data -> features (backbone, h) -> cache -> train -> eval
                                   model (the heads, the export's own files)   -> export -> serve
    configs (plain data, above the stages)  ->  recipes (one per command)  ->  cli.py

``LAYERS`` says what each part may import; a stage never imports ``configs`` or ``recipes``, not even for
types under ``if TYPE_CHECKING:`` (a config is handed to it): configs import the stages' lists of allowed
values, so an import back, however it is guarded, would make the two a circle.
Every import counts, those inside functions too: a lazy import hides a cycle, it does not remove it.
The checks are functions of a source tree, so the tests below also plant a cycle and a layering
violation in a copy of the tree and see them caught.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = "top"  # pipeline/__init__.py and the cross-cutting modules beside it
LAYERS = {
    TOP: set(),
    "data": {TOP},
    "cache": {TOP},
    "model": {TOP},
    "features": {TOP, "model"},
    "train": {TOP, "model", "cache"},
    "eval": {TOP, "model", "train"},
    "export": {TOP, "model", "features"},
    "serve": {TOP, "model", "features", "data", "export"},
    "configs": {TOP, "data", "cache", "features", "model", "train", "eval"},  # the choices live with the stages
    "recipes": {TOP, "data", "features", "cache", "model", "train", "eval", "export", "serve", "configs"},
    "cli": {"recipes", "configs", TOP},
}
RUNS_OTHER_RECIPES = {"pipeline.recipes.demo"}  # `urm demo` runs the other commands; every other recipe only wires stages
TYPE_ONLY: dict[str, set[str]] = {}  # parts one may import for annotations only: none (see the docstring)
SHIPPED = ("heads", "modeling_urm", "configuration_urm")  # pipeline/model/ files copied into every export
SHIPPED_MAY_IMPORT = {"torch", "transformers", "math", "dataclasses", "typing", "__future__"}
MAX_TOP_MODULES = 8


# ----------------------------------------------------------------------------------------------
# Reading a tree's imports


def module_name(root: Path, file: Path) -> str:
    """pipeline/cache/reader.py -> pipeline.cache.reader; pipeline/cache/__init__.py -> pipeline.cache."""
    parts = file.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, is_package: bool) -> str:
    return name if is_package else name.rpartition(".")[0]


def imports(tree: ast.AST, name: str, is_package: bool) -> list[tuple[str, list[str], bool]]:
    """(module, names imported from it, type-only) for every import statement, at any depth."""
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                 for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in type_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package_of(name, is_package)
            if node.level:
                base = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1])
                module = ".".join(p for p in (base, node.module) if p)
            else:
                module = node.module
            out.append((module, [a.name for a in node.names], id(node) in type_only))
    return out


def _is_type_checking(test: ast.AST) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def read_tree(root: Path) -> dict[str, dict]:
    """Every module of pipeline/ (and cli.py) under ``root``: its file, whether a package, its parsed source."""
    files = sorted((root / "pipeline").rglob("*.py")) + [root / "cli.py"]
    out = {}
    for f in files:
        name = module_name(root, f)
        out[name] = {"file": f, "package": f.name == "__init__.py", "tree": ast.parse(f.read_text(), str(f))}
    return out


def part(name: str) -> str:
    """The layer a module belongs to: its subpackage's name (pipeline.cache.reader -> cache), TOP for
    pipeline/__init__.py and the modules beside it, cli for cli.py, "" outside the project."""
    if name == "cli":
        return "cli"
    pieces = name.split(".")
    if pieces[0] != "pipeline":
        return ""
    return pieces[1] if len(pieces) >= 2 and pieces[1] in LAYERS and pieces[1] not in (TOP, "cli") else TOP


def edges(modules: dict[str, dict]) -> dict[str, set[tuple[str, bool]]]:
    """module -> the pipeline modules it makes Python import (the package __init__ of an outside package
    included, since importing pipeline.cache.reader from outside runs pipeline/cache/__init__.py first)."""
    out: dict[str, set[tuple[str, bool]]] = {}
    for name, m in modules.items():
        targets = set()
        for module, names, type_only in imports(m["tree"], name, m["package"]):
            if not (module == "pipeline" or module.startswith("pipeline.")):
                continue
            hit = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            if module in modules and any(f"{module}.{n}" not in modules for n in names):
                hit.append(module)  # names from the package itself, beside submodules
            for target in hit:
                pieces = target.split(".")
                for i in range(2, len(pieces) + 1):  # the packages above it that Python runs on the way
                    ancestor = ".".join(pieces[:i])
                    inside = name == ancestor or name.startswith(ancestor + ".")
                    if ancestor in modules and (ancestor == target or not inside):
                        targets.add((ancestor, type_only))
        out[name] = targets
    return out


# ----------------------------------------------------------------------------------------------
# The checks: each returns what is wrong (empty when the tree is as drawn)


def layering_violations(modules: dict[str, dict]) -> list[str]:
    wrong = []
    for name, targets in edges(modules).items():
        here = part(name)
        for target, type_only in sorted(targets):
            there = part(target)
            allowed = LAYERS.get(here, set()) | {here} | (TYPE_ONLY.get(here, set()) if type_only else set())
            if here == "cli":
                allowed = LAYERS["cli"]
            if here == "recipes" and name not in RUNS_OTHER_RECIPES and target != "pipeline.recipes":
                allowed = allowed - {"recipes"}  # a recipe wires stages: what two recipes share lives in a stage
            if there not in allowed:
                wrong.append(f"{name} ({here}) imports {target} ({there}){' for types' if type_only else ''}")
    return wrong


def import_cycles(modules: dict[str, dict], with_types: bool = False) -> list[list[str]]:
    """Every strongly connected set of modules (Tarjan): run-time imports, and with ``with_types`` the imports for
    annotations too (a circle a type checker walks)."""
    graph = {n: sorted(t for t, type_only in ts if with_types or not type_only) for n, ts in edges(modules).items()}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, []):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(modules: dict[str, dict]) -> list[str]:
    """Private names (``_name``) imported from another layer."""
    wrong = []
    for name, m in modules.items():
        for module, names, _ in imports(m["tree"], name, m["package"]):
            if module.startswith("pipeline") and part(module) != part(name):
                wrong += [f"{name} imports {module}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    return wrong


def asserts(modules: dict[str, dict]) -> list[str]:
    """``assert`` statements (``python -O`` removes them: a check must be an if and a raise)."""
    return [f"{m['file'].name}:{node.lineno}" for name, m in modules.items() if name != "cli"
            for node in ast.walk(m["tree"]) if isinstance(node, ast.Assert)]


# ----------------------------------------------------------------------------------------------
# The tree as it is


@pytest.fixture(scope="module")
def tree():
    return read_tree(ROOT)


def test_pipeline_is_subpackages_and_a_few_cross_cutting_modules(tree):
    top = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    subpackages = {p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == set(LAYERS) - {TOP, "cli"}, subpackages


def test_every_import_follows_the_layering(tree):
    assert layering_violations(tree) == []


def test_no_import_cycle_anywhere(tree):
    assert import_cycles(tree) == []
    assert import_cycles(tree, with_types=True) == []


def test_no_private_name_crosses_a_layer(tree):
    assert private_imports(tree) == []


def test_no_assert_is_used_as_a_check(tree):
    assert asserts(tree) == []


def test_every_subpackage_reexports_its_public_names(tree):
    """Each stage's __init__ has a docstring and an ``__all__`` naming exactly the public names it imports
    from its own modules (torchtune's habit), so callers import from the stage."""
    for name, m in sorted(tree.items()):
        if not (m["package"] and name.count(".") == 1) or name == "pipeline.recipes":
            continue
        body = m["tree"].body
        assert ast.get_docstring(m["tree"]), name
        bound = {a.asname or a.name for node in body if isinstance(node, ast.ImportFrom)
                 and (node.module or "").startswith(name + ".") for a in node.names}
        listed = next(ast.literal_eval(node.value) for node in body if isinstance(node, ast.Assign)
                      and getattr(node.targets[0], "id", None) == "__all__")
        assert sorted(listed) == sorted(bound) and not any(n.startswith("_") for n in listed), name


def test_every_subpackage_docstring_names_each_of_its_modules(tree):
    """The module map is the subpackages' docstrings (docs/layout.md links them): each names every module of its
    subpackage, so a module added, renamed or removed without its line there fails here."""
    assert unmapped_modules(tree) == []


def unmapped_modules(modules: dict[str, dict]) -> list[str]:
    out = []
    for name, m in sorted(modules.items()):
        if not (m["package"] and name.count(".") == 1):
            continue
        doc = ast.get_docstring(m["tree"]) or ""
        for module in sorted(n for n in modules if n.startswith(name + ".") and n.count(".") == 2):
            if not re.search(rf"(?<![\w.]){re.escape(module.rsplit('.', 1)[1])}(?![\w])", doc):
                out.append(f"{name}'s docstring does not name {module}")
    return out


def test_a_module_missing_from_the_map_is_found(copy):
    (copy / "pipeline" / "eval" / "ranking.py").write_text('"""A new module."""\n')
    assert unmapped_modules(read_tree(copy)) == ["pipeline.eval's docstring does not name pipeline.eval.ranking"]


def test_the_exported_model_files_import_only_torch_transformers_and_each_other(tree):
    for file in SHIPPED:
        m = tree[f"pipeline.model.{file}"]
        for module, _, _ in imports(m["tree"], f"pipeline.model.{file}", False):
            if module.startswith("pipeline.model."):
                assert module.rsplit(".", 1)[1] in SHIPPED, (file, module)
            else:
                assert module.split(".")[0] in SHIPPED_MAY_IMPORT, (file, module)


def test_the_cli_calls_recipes_and_reads_configs_only(tree):
    used = {t for t, _ in edges(tree)["cli"]}
    assert {t for t in used if part(t) == "recipes"}, used
    assert {t for t in used if part(t) not in ("recipes",)} <= {"pipeline.configs", "pipeline.errors"}, used


def test_every_recipe_is_a_command(tree):
    recipes = {f.stem for f in (ROOT / "pipeline" / "recipes").glob("*.py")} - {"__init__"}
    cli = {t for t, _ in edges(tree)["cli"]}
    assert recipes == {t.split(".")[2] for t in cli if part(t) == "recipes" and t.count(".") >= 2}


# ----------------------------------------------------------------------------------------------
# The checks catch what they should: planted in a copy of the tree


@pytest.fixture
def copy(tmp_path):
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "cli.py", tmp_path / "cli.py")
    return tmp_path


def plant(root: Path, file: str, line: str, where: str = "end") -> None:
    path = root / file
    text = path.read_text()
    path.write_text(text + f"\n\ndef planted():\n    {line}\n" if where == "end" else line + "\n" + text)


def test_a_planted_cycle_is_found(copy):
    assert import_cycles(read_tree(copy)) == []
    plant(copy, "pipeline/data/records.py", "from pipeline.data.ratings import load_ratings")  # ratings -> records
    cycles = import_cycles(read_tree(copy))
    assert any({"pipeline.data.records", "pipeline.data.ratings"} <= set(c) for c in cycles), cycles


def test_a_planted_layering_violation_is_found(copy):
    plant(copy, "pipeline/model/heads_io.py", "from pipeline.train import fit_gate")  # model must not use train
    wrong = layering_violations(read_tree(copy))
    assert wrong == ["pipeline.model.heads_io (model) imports pipeline.train (train)"], wrong


def test_a_planted_recipe_import_and_config_import_are_found(copy):
    plant(copy, "pipeline/cache/reader.py", "import pipeline.recipes.extract")
    plant(copy, "pipeline/features/rows.py", "from pipeline.configs import ExtractConfig")
    wrong = layering_violations(read_tree(copy))
    assert any("pipeline.cache.reader (cache) imports pipeline.recipes" in w for w in wrong), wrong
    assert any("pipeline.features.rows (features) imports pipeline.configs" in w for w in wrong), wrong


def test_a_planted_recipe_importing_another_recipe_is_found(copy):
    plant(copy, "pipeline/recipes/curate.py", "from pipeline.recipes.score import score_file")
    plant(copy, "pipeline/recipes/demo.py", "from pipeline.recipes.score import score_file")
    wrong = layering_violations(read_tree(copy))
    assert wrong == ["pipeline.recipes.curate (recipes) imports pipeline.recipes.score (recipes)"], wrong


def test_a_type_only_import_of_the_configs_is_a_circle_caught(copy):
    """configs -> train (the losses, the gates) and train -> configs for types: a circle, refused."""
    plant(copy, "pipeline/train/losses.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
          "    from pipeline.configs import GatingConfig", where="start")
    assert layering_violations(read_tree(copy)) == [
        "pipeline.train.losses (train) imports pipeline.configs (configs) for types"]


def test_a_planted_private_import_and_assert_are_found(copy):
    plant(copy, "pipeline/train/feature_stream.py", "from pipeline.cache.reader import _out_dtype")
    plant(copy, "pipeline/data/records.py", "assert True")
    modules = read_tree(copy)
    assert private_imports(modules) == ["pipeline.train.feature_stream imports pipeline.cache.reader._out_dtype"]
    assert asserts(modules) and asserts(modules)[0].startswith("records.py:")
