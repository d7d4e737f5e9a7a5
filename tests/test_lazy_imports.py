"""The model, the shard reader and batch packing need only torch, numpy, pyarrow and pyyaml.

GPU machines get a bare torch environment (no ray, deepspeed, pymatgen, ase; bench/gpu_step.py runs
there), so these modules must not import the rest of the stack at import time or on the way from
shard rows to a training step. Checked in a subprocess whose import system refuses those packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from paths import ROOT

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
