"""The code's shape, read from its imports: components never import a recipe, and the CLI calls recipes.

Recipes (pipeline/recipes/: one module per command) wire components together; components (every
other module of pipeline/) are the reusable parts and must not depend on a command's wiring.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(file: Path, package: str) -> set[str]:
    """Every module ``file`` imports (relative imports resolved against ``package``), at any depth."""
    out = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}  # `from pipeline import recipes`
    return out


def is_recipe(module: str) -> bool:
    return module == "pipeline.recipes" or module.startswith("pipeline.recipes.")


def test_components_never_import_a_recipe():
    components = sorted((ROOT / "pipeline").glob("*.py"))
    assert len(components) > 20 and (ROOT / "pipeline" / "heads.py") in components
    offenders = {f.name: sorted(filter(is_recipe, imported_modules(f, "pipeline"))) for f in components}
    assert not {name: mods for name, mods in offenders.items() if mods}


def test_the_cli_calls_recipes_and_reads_configs_only():
    used = {m for m in imported_modules(ROOT / "cli.py", "") if m.startswith("pipeline")}
    assert {m for m in used if is_recipe(m)}, used
    assert {m for m in used if not is_recipe(m)} <= {"pipeline", "pipeline.config", "pipeline.errors",
                                                     "pipeline.errors.USER_ERRORS"}, used


def test_every_recipe_is_a_command():
    recipes = {f.stem for f in (ROOT / "pipeline" / "recipes").glob("*.py")} - {"__init__"}
    cli = imported_modules(ROOT / "cli.py", "")
    assert recipes == {m.split(".")[2] for m in cli if is_recipe(m) and m.count(".") >= 2}
