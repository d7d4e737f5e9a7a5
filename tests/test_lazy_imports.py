"""Which imports are lazy, and why.

- The model, the shard reader and batch packing need only torch, numpy, pyarrow and pyyaml. GPU
  machines get a bare torch environment (no ray, deepspeed, pymatgen, ase; bench/gpu_step.py runs
  there), so these modules must not import the rest of the stack at import time or on the way from
  shard rows to a training step. Checked in a subprocess whose import system refuses those packages.
- Preprocessing and its Ray workers never import torch (reading, validating and tabulating crystals
  is numpy work, and a worker process that imports torch costs ~0.3 GB and seconds to start).
- A ``cfdist`` module imports another inside a function only where that is deliberate (a heavy
  dependency on a path that must not pay for it, or the lazy CLI); :data:`DELIBERATE_LAZY` names
  each such import and its reason, and nothing else is imported inside a function. Third-party
  packages (Ray, DeepSpeed, matplotlib, torch internals) are imported where used and not listed.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest

from paths import ROOT

PACKAGE = ROOT / "cfdist"

# (importer, imported cfdist module) -> why the import sits inside a function.
DELIBERATE_LAZY = {
    **{("cfdist.cli", module): "the CLI imports a command's modules only when that command runs, so "
                               "`cfdist --help` and `cfdist configs` start in a fraction of a second"
       for module in ("cfdist.checkpoint", "cfdist.io", "cfdist.predict", "cfdist.finetune.tasks", "cfdist.config",
                      "cfdist.preprocess.cli", "cfdist.preprocess.publish", "cfdist.train.driver",
                      "cfdist.finetune.driver", "cfdist.export", "cfdist.finetune.sweep")},
    ("cfdist.shards", "cfdist.batch"): "collate_arrow builds a CrystalBatch (torch); preprocessing writes shards "
                                       "through cfdist.shards and never imports torch",
}

# Packages a bare GPU machine lacks (and ones the model path should not need anyway).
BLOCKED = ("ray", "deepspeed", "pymatgen", "ase", "tqdm", "matplotlib", "scipy", "pandas", "tensorboard")

# Installed first in the child: the blocked packages look not installed. The path finder (the
# finder of installed packages) no longer finds them, so ``import`` raises ModuleNotFoundError and
# importlib.util.find_spec returns None (how torch and pyarrow probe optional packages).
BLOCKER = textwrap.dedent(f"""
    import importlib.machinery, sys
    BLOCKED = {BLOCKED!r}
    class _NotInstalled(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return super().find_spec(name, path, target)
    sys.meta_path[:] = [_NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    assert _NotInstalled in sys.meta_path
""")

LIGHT_MODULES = ("cfdist", "cfdist.model", "cfdist.config", "cfdist.batch", "cfdist.graph", "cfdist.shards",
                 "cfdist.manifest", "cfdist.data", "cfdist.stream", "cfdist.compile", "cfdist.ops.dense_box")


def run_blocked(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c BLOCKER + code args...`` from the repository root (cfdist importable)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT, check=False)


def test_blocker_refuses_the_blocked_packages():
    """The checks below would pass vacuously if the blocker did not block (every package is installed
    here): each blocked package fails to import and is not found, as if not installed."""
    res = run_blocked("""
        import importlib.util, json
        failed = []
        for name in BLOCKED:
            try:
                __import__(name)
            except ModuleNotFoundError:
                if importlib.util.find_spec(name) is None:
                    failed.append(name)
        print(json.dumps(failed))
    """)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == list(BLOCKED)


def test_model_shards_and_packing_work_without_the_heavy_stack(shard_dir):
    """Import the light modules, read shards, pack rows into budgeted batches, collate, and run a
    training step of a tiny model, all with ray / deepspeed / pymatgen / ase / ... unavailable."""
    res = run_blocked(f"""
        import json, sys
        for name in {LIGHT_MODULES!r}:
            __import__(name)
        import torch
        from cfdist.config import CrystalformerConfig
        from cfdist.data import BatchBudget, iter_local_shards, pack_rows
        from cfdist.manifest import ShardSet
        from cfdist.model import Crystalformer
        from cfdist.shards import collate_arrow

        shards = ShardSet(sys.argv[1])
        tables = iter_local_shards([e.path for e in shards.files("train")], rows_per_read=8)
        batches = [collate_arrow(t, ["e_form"], shards.cutoff) for t in pack_rows(tables, BatchBudget(20_000, 400, 16))]
        model = Crystalformer(CrystalformerConfig(n_blocks=1, d_model=16, n_heads=2, d_ff=32, n_basis=8,
                                                  head_hidden=16, cutoff_sigmas=4.0, target_names=["e_form"]))
        loss = model(batches[0]).abs().mean()
        loss.backward()
        print(json.dumps({{"batches": len(batches), "rows": sum(b.n_crystals for b in batches),
                          "loss": float(loss), "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
    """, str(shard_dir))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["batches"] > 1 and out["rows"] == 48 and out["loaded"] == [], out  # all 48 train rows packed
    assert out["loss"] == out["loss"] and out["loss"] > 0  # finite (not NaN) and a real loss


def function_level_imports() -> set[tuple[str, str]]:
    """(importer, imported) for every ``cfdist`` import inside a function of the package."""
    found = set()
    for path in sorted((ROOT / "cfdist").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        importer = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                found.update((importer, name) for name in names if name and name.split(".")[0] == "cfdist")
    return found


def test_every_function_level_cfdist_import_is_deliberate():
    """Hoist an import to the module's top unless it is deliberately lazy; name a new deliberate one
    in DELIBERATE_LAZY with its reason (and drop entries whose import is gone)."""
    found = function_level_imports()
    assert found - set(DELIBERATE_LAZY) == set(), "function-level imports to hoist (or name as deliberate)"
    assert set(DELIBERATE_LAZY) - found == set(), "DELIBERATE_LAZY names imports that no longer exist"
    assert ("cfdist.shards", "cfdist.batch") in found  # the scan sees imports inside functions


def test_preprocessing_never_imports_torch():
    """Importing the preprocessing job, the readers, the shard format and the manifest, and writing a
    shard from crystals (what a preprocessing worker does), loads no torch."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json, sys, tempfile
        from pathlib import Path
        import numpy as np
        import cfdist.preprocess.cli, cfdist.preprocess.job, cfdist.io, cfdist.manifest
        from cfdist.crystal import Crystal
        from cfdist.geometry import image_table
        from cfdist.shards import crystals_to_arrow, read_shard, shard_metadata, write_shard

        crystal = Crystal("nacl", np.array([11, 17]), 5.6 * np.eye(3), np.array([[0, 0, 0], [2.8, 2.8, 2.8]]))
        table = crystals_to_arrow([crystal], [image_table(crystal.lattice, crystal.positions, 6.0)], ["src"], [])
        path = Path(tempfile.mkdtemp()) / "part.parquet"
        write_shard(path, table, shard_metadata(6.0, []))
        print(json.dumps({"rows": read_shard(path).num_rows, "torch": "torch" in sys.modules}))
    """)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"rows": 1, "torch": False}


@pytest.mark.slow  # two Python processes that import torch, DeepSpeed and MLflow: ~10 s on 2 cores
def test_deepspeed_is_imported_without_its_autotuners_mlflow_import():
    """DeepSpeed's autotuner imports MLflow at import time when it is installed (~1.3 s of imports
    in every training process; MLflow is in the test extra). cfdist imports DeepSpeed through
    cfdist.run.deepspeed_import: every ``import deepspeed...`` in the package comes after a call to
    ``import_deepspeed()`` in the same function; the helper leaves MLflow unimported and importable,
    and an MLflow imported before DeepSpeed (cfdist's MLflow tracking) stays as it is."""
    unguarded = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "deepspeed_import.py":
            continue
        tree = ast.parse(path.read_text())
        for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]:
            body = list(ast.walk(scope)) if scope is not tree else list(ast.iter_child_nodes(tree))
            guards = [n.lineno for n in body if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "import_deepspeed"]
            for node in body:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.split(".")[0] == "deepspeed" for n in names) and not any(g < node.lineno for g in guards):
                    unguarded.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert unguarded == [], unguarded

    def child(code: str) -> list[str]:
        res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"},
                             cwd=ROOT, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout.split()[-3:]

    assert child("""
        import sys
        from cfdist.run.deepspeed_import import import_deepspeed
        import_deepspeed()
        import deepspeed.autotuning.autotuner as autotuner
        hidden = "mlflow" not in sys.modules and not autotuner.has_mlflow
        import mlflow
        print(hidden, mlflow.__name__, "mlflow" in sys.modules)
    """) == ["True", "mlflow", "True"]
    assert child("""
        import sys
        import mlflow
        from cfdist.run.deepspeed_import import import_deepspeed
        import_deepspeed()
        import deepspeed.autotuning.autotuner as autotuner
        print(sys.modules["mlflow"] is mlflow, autotuner.has_mlflow, "-")
    """) == ["True", "True", "-"]
