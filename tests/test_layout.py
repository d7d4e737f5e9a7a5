"""The repository stands on its own and each layer owns its logic (checked on the source, fast).

- No tracked file refers to the data folder beside our own checkouts (a user's clone has none).
- ``cfdist`` imports nothing from the top-level scripts (``launch``, ``preprocess``); fine-tuning
  imports nothing from pretraining (both build on ``cfdist.run``); the package never locates its
  own repository (configs are package data).
- ``launch/`` and ``preprocess/`` hold thin entry points only.
"""

from __future__ import annotations

import ast
import subprocess

import pytest

from paths import ROOT

PACKAGE = ROOT / "cfdist"
SKIP_DIRS = {".git", ".venv", "__pycache__", "outputs", "data", ".pytest_cache", "build"}


def tracked_files() -> list:
    """The repository's files: ``git ls-files`` in a checkout, else every file outside build outputs."""
    if (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]
    return [p for p in ROOT.rglob("*") if p.is_file() and not (set(p.relative_to(ROOT).parts) & SKIP_DIRS)]


def imports_of(path) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def package_modules() -> list:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_tracked_file_refers_to_the_folder_beside_our_checkouts():
    needle = "../" + "shared"  # spelled in two parts so this file does not match itself
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue  # binary data
        hits += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1) if needle in line]
    assert not hits, f"files referring to {needle}: {hits}"


def test_the_package_imports_no_top_level_script_folder():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.split(".")[0] in ("launch", "preprocess"))
                 for p in package_modules()}
    assert not {k: v for k, v in offenders.items() if v}


def test_finetuning_imports_nothing_from_pretraining():
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports_of(p) if m.startswith("cfdist.train"))
                 for p in sorted((PACKAGE / "finetune").rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_package_never_looks_for_its_repository():
    offenders = [str(p.relative_to(ROOT)) for p in package_modules() if ".parents[" in p.read_text()]
    assert not offenders, "use package data (importlib.resources) instead of paths relative to the repository"


@pytest.mark.parametrize("script", ["launch/pretrain.py", "launch/finetune.py", "preprocess/build_shards.py"])
def test_entry_scripts_are_thin(script):
    path = ROOT / script
    tree = ast.parse(path.read_text())
    code = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(code) <= 4, f"{script}: {len(code)} top-level statements; logic belongs in the package"
    assert {m.split(".")[0] for m in imports_of(path)} <= {"sys", "cfdist"}
    assert not (ROOT / script).with_name("__init__.py").exists(), "the script folders are not packages"


def test_readers_export_what_other_modules_import():
    import cfdist.io

    assert "default_id" in cfdist.io.__all__
    assert all(hasattr(cfdist.io, name) for name in cfdist.io.__all__)
