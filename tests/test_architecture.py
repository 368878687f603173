"""The layers' import rules (pyproject.toml [tool.importlinter], docs/architecture.md), checked by import-linter:
they hold on this tree, they cover every top-level module, and breaking one fails the check."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import raysvc

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _contract(name: str) -> dict:
    return next(c for c in CONTRACTS if c["name"] == name)


def test_import_rules_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken" in out.stdout


def test_rules_name_every_top_level_module():
    """A new top-level module must be placed in the rules: ops may import none of them, models only ops, and none
    may import the command line."""
    top = {f"raysvc.{m.name}" for m in pkgutil.iter_modules(raysvc.__path__)}
    assert set(_contract("ops import nothing of raysvc")["forbidden_modules"]) == top - {"raysvc.ops"}
    assert set(_contract("models import only ops")["forbidden_modules"]) == top - {"raysvc.ops", "raysvc.models"}
    assert set(_contract("nothing imports the command line")["source_modules"]) == top - {"raysvc.cli"}


def test_a_broken_rule_fails_the_check(tmp_path):
    """Serving that imports training, and an op that imports data, in a copy of the package: both contracts break."""
    shutil.copytree(ROOT / "raysvc", tmp_path / "raysvc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "raysvc" / "serve" / "shortcut.py").write_text("from raysvc.train.driver import run_job  # noqa\n")
    grid = tmp_path / "raysvc" / "ops" / "grid.py"
    grid.write_text(grid.read_text() + "\nfrom raysvc.data.contract.schema import flat_values  # noqa\n")
    out = _lint(tmp_path, pythonpath=tmp_path)
    assert out.returncode != 0, out.stdout
    assert "serving and inference never import training BROKEN" in out.stdout
    assert "ops import nothing of raysvc BROKEN" in out.stdout
    assert "raysvc.serve.shortcut -> raysvc.train.driver" in out.stdout
    assert "models import only ops KEPT" in out.stdout


def test_architecture_recipes_touch_at_most_two_existing_files():
    """docs/architecture.md: for a new method, head and detector, the existing files one touches exist and are at
    most two per recipe (the rest is new files)."""
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text()
    recipes = re.split(r"^### ", doc.split("## Recipes", 1)[1].split("\n## ", 1)[0], flags=re.M)[1:]
    assert [r.splitlines()[0].split(" (")[0] for r in recipes] == [
        "A new self-supervised method",
        "A new downstream head or task",
        "A new detector",
    ]
    for recipe in recipes:
        touched = re.findall(r"^\d\. `([^`]+)`", recipe.split("Touch:", 1)[1], flags=re.M)
        assert 1 <= len(touched) <= 2, recipe.splitlines()[0]
        assert all((ROOT / path).is_file() for path in touched), touched
