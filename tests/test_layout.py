"""The repository's layout and the package's layers (checked on the source, fast).

Layers, lowest first. A module may import only from its own layer or lower ones, read on the AST
with every import counted (module level, inside functions, under ``TYPE_CHECKING``); ``train``
and ``finetune`` are siblings that import nothing from each other:

    base           cfdist (the root: ``__version__``; its public names are lazy strings, no imports),
                   fileio, storage (object storage and local paths through pyarrow.fs), geometry,
                   crystal, config (YAML machinery + the model config),
                   cluster (the Ray bootstrap every job shares, preprocessing included)
    io             cfdist.io: raw input formats
    shards/manifest  batch (the in-memory batch shard rows collate into), shards (the on-disk
                   format), manifest (the shard directory's index and its split names)
    preprocess     cfdist.preprocess: raw inputs -> shards + manifest
    data/stream    data (budgets, packing), stream (a rank's training stream)
    model          graph, ops, model, compile, testing (reference crystals and models for tests)
    run            cfdist.run (configs, objective, optimiser, metrics, weight transfer) and
                   checkpoint (the portable format the loops write and read)
    train | finetune   pretraining | fine-tuning
    export         DeepSpeed checkpoint -> portable checkpoint
    predict/calculator/cli   the user-facing end

The issue's chain io -> preprocess -> shards/manifest -> data/stream -> ... is the data's path. In
import terms the shard format sits below preprocessing, which writes it: the issue's own rule that
the manifest imports nothing from preprocessing asks for exactly that. Likewise the checkpoint
format sits in the run layer so that the loops, which write it, may import it.

Also: no tracked file refers to the data folder beside our own checkouts; the package imports
nothing from the top-level scripts (``launch``, ``preprocess``) and never locates its own
repository; ``configs/`` at the top level is the one copy of the YAML configs; ``launch/`` and
``preprocess/`` hold thin entry points only.
"""

from __future__ import annotations

import ast
import subprocess

import pytest

from paths import ROOT

PACKAGE = ROOT / "cfdist"
SKIP_DIRS = {".git", ".venv", "__pycache__", "outputs", "data", ".pytest_cache", "build"}

# (layer, its groups); groups of one layer are siblings. A module's group is its longest prefix here.
LAYERS: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...] = (
    ("base", (("cfdist", "cfdist.fileio", "cfdist.storage", "cfdist.geometry", "cfdist.crystal", "cfdist.config",
              "cfdist.cluster"),)),
    ("io", (("cfdist.io",),)),
    ("shards/manifest", (("cfdist.batch", "cfdist.shards", "cfdist.manifest"),)),
    ("preprocess", (("cfdist.preprocess",),)),
    ("data/stream", (("cfdist.data", "cfdist.stream", "cfdist.mixture"),)),
    ("model", (("cfdist.graph", "cfdist.ops", "cfdist.model", "cfdist.compile", "cfdist.testing"),)),
    ("run", (("cfdist.run", "cfdist.checkpoint"),)),
    ("train | finetune", (("cfdist.train",), ("cfdist.finetune",))),
    ("export", (("cfdist.export",),)),
    ("predict/calculator/cli", (("cfdist.predict", "cfdist.calculator", "cfdist.cli"),)),
)

def tracked_files() -> list:
    """The repository's files: ``git ls-files`` in a checkout, else every file outside build outputs."""
    if (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]
    return [p for p in ROOT.rglob("*") if p.is_file() and not (set(p.relative_to(ROOT).parts) & SKIP_DIRS)]


def package_modules() -> list:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path) -> str:
    """``cfdist/run/optim.py`` -> ``cfdist.run.optim``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p) for p in package_modules()}


def imports_of(path) -> set[str]:
    """Every module a source file imports, at any depth (function-level imports included);
    ``from a.b import c`` counts as ``a.b.c`` when that is a module of the package, else ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the file is in
                here = module_name(path).split(".")[:None if path.name == "__init__.py" else -1]
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


def group_of(module: str) -> tuple[int, str] | None:
    """(layer rank, group name) of a cfdist module: the group holding its longest prefix."""
    best = None
    for rank, (_, groups) in enumerate(LAYERS):
        for group in groups:
            for prefix in group:
                if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), rank, group[0])
    return None if best is None else best[1:]


def upward_imports() -> dict[tuple[str, str], str]:
    """(importer, imported) -> why it breaks the layers, for every cfdist import that does."""
    return upward_imports_of({module_name(path): path for path in package_modules()})


def upward_imports_of(modules: dict) -> dict[tuple[str, str], str]:
    """:func:`upward_imports` for ``{module name: source path}``."""
    bad = {}
    for importer, path in modules.items():
        rank, group = group_of(importer)
        for target in sorted(m for m in imports_of(path) if m == "cfdist" or m.startswith("cfdist.")):
            t_rank, t_group = group_of(target)
            if t_rank > rank:
                bad[importer, target] = f"{LAYERS[t_rank][0]} is above {LAYERS[rank][0]}"
            elif t_rank == rank and t_group != group:
                bad[importer, target] = f"{t_group} and {group} are siblings"
    return bad


def test_every_module_has_a_layer():
    """A new module is placed in LAYERS (and in docs/layout.md) before it can be imported anywhere."""
    assert not sorted(m for m in MODULES if group_of(m) is None)
    assert {"cfdist.cluster", "cfdist.run.transfer", "cfdist.manifest", "cfdist.train.loop"} <= MODULES


def test_imports_point_down_the_layers():
    bad = upward_imports()
    assert not bad, "\n".join(f"{a} imports {b}: {why}" for (a, b), why in sorted(bad.items()))


def test_the_layer_check_sees_function_level_and_sibling_imports(tmp_path):
    """The checks above would pass vacuously if they missed imports inside functions or siblings."""
    assert group_of("cfdist.train.loop") == (7, "cfdist.train") and group_of("cfdist.finetune.loop")[1] == "cfdist.finetune"
    assert group_of("cfdist.config") == (0, "cfdist") and group_of("cfdist.run.transfer")[0] == 6
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from cfdist.run import transfer\n    import cfdist.predict\n")
    assert imports_of(source) == {"cfdist.run.transfer", "cfdist.predict"}
    source.write_text("def f():\n    import cfdist.predict\n")  # an upward arrow inside a function is one
    assert ("cfdist.run.probe", "cfdist.predict") in upward_imports_of({"cfdist.run.probe": source})


@pytest.mark.parametrize("importer, forbidden", [
    ("cfdist.train", "cfdist.finetune"),  # pretraining imports nothing from fine-tuning
    ("cfdist.finetune", "cfdist.train"),  # and the other way round (both build on cfdist.run)
    ("cfdist.manifest", "cfdist.preprocess"),  # the manifest is read by training: no preprocessing in it
    ("cfdist.preprocess", "cfdist.run"),  # preprocessing needs the Ray bootstrap (cfdist.cluster), not the run layer
    ("cfdist.preprocess", "cfdist.train"),
])
def test_named_arrows_that_must_not_exist(importer, forbidden):
    offenders = {module_name(p): sorted(m for m in imports_of(p) if m == forbidden or m.startswith(forbidden + "."))
                 for p in package_modules() if module_name(p) == importer or module_name(p).startswith(importer + ".")}
    assert offenders and not {k: v for k, v in offenders.items() if v}


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


def test_the_package_never_looks_for_its_repository():
    offenders = [str(p.relative_to(ROOT)) for p in package_modules() if ".parents[" in p.read_text()]
    assert not offenders, "use package data (importlib.resources) instead of paths relative to the repository"


def test_configs_live_at_the_top_level_and_the_package_reaches_them_by_name():
    """``configs/`` is the one copy; ``cfdist/configs`` is a symlink to it (a wheel build follows it
    and ships the files: tests/test_packaging.py), so a checkout reads the same files by name."""
    from cfdist.config import CONFIG_KINDS, packaged_configs, resolve_config

    link = PACKAGE / "configs"
    assert link.is_symlink() and link.readlink().as_posix() == "../configs", "cfdist/configs -> ../configs"
    yaml = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert {kind for kind in CONFIG_KINDS} == {name.split("/")[0] for name in yaml}
    assert not list((ROOT / "configs").rglob("*.py")), "configs/ holds YAML only"
    assert sorted(f"{kind}/{name}.yaml" for kind in CONFIG_KINDS for name in packaged_configs(kind)) == yaml
    assert resolve_config("megnet_slice", "pretrain").resolve() == (ROOT / "configs/pretrain/megnet_slice.yaml")
    assert resolve_config("deepspeed/zero2", "deepspeed").resolve() == (ROOT / "configs/deepspeed/zero2.yaml")


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


def test_every_cfdist_environment_variable_is_in_the_docs_table():
    """docs/environment.md lists every ``CFDIST_*`` variable the package mentions, each with the
    function that reads it; the variable appears in that function's module."""
    import re

    rows = {}
    for line in (ROOT / "docs" / "environment.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"`CFDIST_\w+`", cells[0]):
            rows[cells[0].strip("`")] = re.findall(r"`(cfdist\.[\w.]+)`", cells[3])
    used = {name for p in package_modules() for name in re.findall(r"\bCFDIST_[A-Z_]+\b", p.read_text())}
    assert used and sorted(used) == sorted(rows), "docs/environment.md's table and the package disagree"
    for name, readers in rows.items():
        assert readers, f"{name}: no reader named"
        for reader in readers:  # cfdist.fileio.user_cache_dir -> cfdist/fileio.py
            parts = reader.split(".")
            while parts and ".".join(parts) not in MODULES:
                parts.pop()
            assert parts, f"{name}: {reader} is no cfdist module or function"
            module = ROOT.joinpath(*parts).with_suffix(".py")
            module = module if module.is_file() else ROOT.joinpath(*parts, "__init__.py")
            source = module.read_text()
            assert name in source, f"{name}: not in {module.relative_to(ROOT)} ({reader})"
