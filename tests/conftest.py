"""Shared fixtures and helpers: real structures from the committed data, float64 models with frozen
sigma stats, small shard directories (built without Ray), the tiny model every training test uses,
the environment and subprocess helper of every command a test runs, and the launcher of the one
torchrun program (``tests/scripts/train_matrix.py``).

Data (all in the repository): ``tests/data/megnet_64.json`` (64 real crystals; most tests need no
more) and the full example slice ``examples/data/megnet_slice.json.gz`` (3,909 crystals).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from paths import FIXTURES, MEGNET_SLICE, ROOT, require
from ray_cluster_fixture import LocalCluster, free_port, local_cluster

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# ---- the environment and subprocess helper of every command a test runs
# Ray without token auth (docs: the token-auth trap), DeepSpeed on CPU without building its ops, the
# checkout under test first on the path, 2 CPUs for Ray (the CI machine's), one OpenMP thread per
# process (several processes share 2 cores; more threads only contend).
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0",
       "PYTHONPATH": str(ROOT), "CFDIST_RAY_NUM_CPUS": "2", "OMP_NUM_THREADS": "1"}


def run(cmd, timeout: float, env: dict | None = None, cwd: Path = ROOT, **kwargs) -> subprocess.CompletedProcess:
    """``cmd`` (items str()-ed) in ``cwd`` (the checkout) with :data:`ENV` (plus ``env``), output captured as text."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, cwd=cwd, **kwargs)


def torchrun_launcher(nproc: int = 2) -> tuple[str, ...]:
    """``python`` arguments that start ``nproc`` local torchrun ranks on a free rendezvous port."""
    return ("-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()))


# ---- the tiny model every training test uses (the default architecture, narrowed)
def tiny_model(**overrides) -> dict:
    """Model config dict of a 2-block, 32-wide Crystalformer (trains in seconds on a CPU), with ``overrides``."""
    return {"n_blocks": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "n_basis": 16, "head_hidden": 32, **overrides}


# ---- the one torchrun program: short DeepSpeed trainings, results as JSON files
def deepspeed_runs(runs: list[dict], out: Path, timeout: float = 600, env: dict | None = None) -> dict[str, dict]:
    """Train every run of ``runs`` (dicts of ``tests/scripts/train_matrix.py``'s ``RunSpec``) in one
    2-rank torchrun job (gloo); returns ``{name: result}`` read from ``out/<name>/result.json``."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "runs.json"
    spec.write_text(json.dumps(runs, indent=1))
    res = run([sys.executable, *torchrun_launcher(2), "tests/scripts/train_matrix.py", spec, out], timeout, env)
    (out / "torchrun.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return {r["name"]: json.loads((out / r["name"] / "result.json").read_text()) for r in runs}


def build_shards(inputs: list[Path], out: Path, targets: list[str], **settings) -> Path:
    """``cfdist preprocess`` of ``inputs`` into ``out`` in this process (no Ray: the same chunk and
    finalize functions, cfdist.preprocess.job.build(in_process=True)); returns ``out``."""
    from cfdist.preprocess.job import Settings, build

    if settings.get("split_file") is not None:
        settings["split_file"] = str(Path(settings["split_file"]).resolve())
    build([str(p) for p in inputs], out, Settings(targets=list(targets), **settings), in_process=True)
    return out


@pytest.fixture(scope="session")
def megnet_records() -> list[dict]:
    """64 real Materials Project crystals (the first records of the MEGNet slice), JARVIS-style dicts."""
    return json.loads(require(FIXTURES / "megnet_64.json").read_text())


@pytest.fixture(scope="session")
def megnet_slice_records() -> list[dict]:
    """The whole real MEGNet slice (3,909 crystals), for the few tests that need more than 64."""
    with gzip.open(require(MEGNET_SLICE), "rt") as f:
        return json.load(f)


def _crystals(records):
    from cfdist.crystal import from_jarvis

    return [from_jarvis(r["atoms"], id=r["id"], labels={"e_form": r["e_form"]}) for r in records]


@pytest.fixture(scope="session")
def megnet_crystals(megnet_records):
    return _crystals(megnet_records)


@pytest.fixture(scope="session")
def megnet_slice_crystals(megnet_slice_records):
    return _crystals(megnet_slice_records)


def freeze_sigma_stats(model, seed: int = 0):
    """Set every layer's sigma statistics to fixed non-trivial values (as after a first batch)."""
    gen = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        att = block.attention
        att.sigma_mean.fill_(float(torch.randn((), generator=gen)) * 0.1)
        att.sigma_std.fill_(0.5 + float(torch.rand((), generator=gen)))
    return model


TINY_ENERGY = tiny_model(energy=True, d_model=16, n_heads=2, d_ff=32, n_basis=8, head_hidden=16, target_names=[])


def energy_model(seed: int = 0, dtype=torch.float64, **overrides):
    """A tiny random energy model in its 'trained' state: frozen sigma statistics, nonzero element
    references (-1 .. -5 eV/atom) and energy_scale 10 (forces of ~0.01-0.1 eV/A on real crystals)."""
    from cfdist import Crystalformer, CrystalformerConfig

    torch.manual_seed(seed)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(**{**TINY_ENERGY, **overrides})), seed).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.element_energy.copy_(-1.0 - 4.0 * torch.rand(model.config.n_elements, generator=gen, dtype=torch.float64))
        model.energy_scale.fill_(10.0)
    return model


@pytest.fixture()
def model64():
    """Default-config Crystalformer in float64, eval mode, sigma stats frozen."""
    from cfdist import Crystalformer

    torch.manual_seed(0)
    return freeze_sigma_stats(Crystalformer()).double().eval()


@pytest.fixture()
def rng():
    return np.random.default_rng(12345)


# ---- a small shard directory laid out as the preprocessing job writes it
CUTOFF = 8.9095
TARGETS = ["e_form"]
N_CRYSTALS = 60
# (split, first row, stop row) of each shard file, in manifest order
LAYOUT = [("train", 0, 14), ("train", 14, 27), ("train", 27, 38), ("train", 38, 48), ("val", 48, 54),
          ("val", 54, 60)]


@pytest.fixture(scope="session")
def shard_dir(megnet_crystals, tmp_path_factory):
    """DIR/<split>/part-NNNNNN.parquet + manifest.json (cfdist.manifest), written without Ray."""
    from cfdist.geometry import image_table
    from cfdist.manifest import shard_record, write_manifest
    from cfdist.preprocess.statistics import StatsAccumulator
    from cfdist.shards import crystals_to_arrow, shard_metadata, write_shard

    crystals = megnet_crystals[:N_CRYSTALS]
    tables = [image_table(c.lattice, c.positions, CUTOFF) for c in crystals]
    root = tmp_path_factory.mktemp("shards")
    shards, stats = [], StatsAccumulator(TARGETS)
    for chunk, (split, lo, hi) in enumerate(LAYOUT):
        rel = f"{split}/part-{chunk:06d}.parquet"
        arrow = crystals_to_arrow(crystals[lo:hi], tables[lo:hi], [f"megnet:{k}" for k in range(lo, hi)], TARGETS)
        # small row groups so reads and shuffles see several record batches per file
        write_shard(root / rel, arrow, shard_metadata(CUTOFF, TARGETS, chunk=chunk, split=split), row_group_size=4)
        shards.append(shard_record(root, rel, split, hi - lo))
        stats.add(split, arrow)
    write_manifest(root, cutoff=CUTOFF, targets=TARGETS, shards=shards, statistics=stats.summary())
    return root


# ---- shard directories built by the preprocessing job (in this process, no Ray)
@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, megnet_records):
    """48 real crystals: 32 train / 8 val / 8 test, 6 chunks of 8 so every split has several files;
    the default model's cutoff."""
    from cfdist.config import CrystalformerConfig

    root = tmp_path_factory.mktemp("tiny")
    records = megnet_records[:48]
    (root / "raw.json").write_text(json.dumps(records))
    names = ["train", "train", "train", "train", "val", "test"]
    split = {name: [r["id"] for k, r in enumerate(records) if names[k % 6] == name] for name in ("train", "val", "test")}
    (root / "split.json").write_text(json.dumps(split))
    return build_shards([root / "raw.json"], root / "shards", ["e_form"], split_file=root / "split.json",
                        shard_size=8, cutoff=CrystalformerConfig().cutoff)


# ---- the property-model DeepSpeed runs (one torchrun job serves test_pretrain and test_compile)
MATRIX_SPECS = {f"z{s}-{p}": {"zero_stage": s, "precision": p} for s in (0, 1, 2, 3) for p in ("fp32", "bf16")}
MATRIX_SPECS.update({
    "z0-fp32-ckpt": {"zero_stage": 0, "activation_checkpointing": True},
    "z3-bf16-ckpt": {"zero_stage": 3, "precision": "bf16", "activation_checkpointing": True},
    "z2-fp32-accum2": {"zero_stage": 2, "gradient_accumulation_steps": 2},
    # compute.compile (aot_eager backend: the job's CFDIST_COMPILE_BACKEND); eager reference: z0-fp32
    "z2-fp32-compiled": {"zero_stage": 2, "compile": True},
    "z1-bf16-compiled": {"zero_stage": 1, "precision": "bf16", "compile": True},
})


# bad steps on 2 ranks under ZeRO-3 (tests/test_bad_steps.py): one corrupt train row, 8 structures a
# micro-batch (2 steps an epoch per rank; the row is in exactly one rank's step of each epoch), a
# checkpoint after every step so that a skipped step's checkpoint can be compared with the one before
BAD_STEP_RUN = {"name": "z3-fp32-badsteps", "zero_stage": 3, "max_structures": 8, "checkpoint_every": 1,
                "keep_checkpoints": 6}


def corrupt_shards(shard_dir: Path, dest: Path, column: str = "positions") -> tuple[Path, str]:
    """A copy of ``shard_dir`` whose first train row (manifest order) has NaN ``column`` values (its
    sha256 no longer matches: read with ``verify_checksums`` off); ``(dest, that row's id)``."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(shard_dir, dest)
    path = sorted((dest / "train").glob("*.parquet"))[0]
    table = pq.read_table(path)
    k = table.schema.get_field_index(column)
    values = table.column(column).to_pylist()
    values[0] = [float("nan")] * len(values[0]) if isinstance(values[0], list) else float("nan")
    table = table.set_column(k, table.schema.field(k), pa.array(values, type=table.schema.field(k).type))
    pq.write_table(table, path, row_group_size=4)
    return dest, table.column("id")[0].as_py()


@pytest.fixture(scope="session")
def property_runs(tiny_shards, tmp_path_factory) -> dict[str, dict]:
    """:data:`MATRIX_SPECS`, 6 steps each of the tiny e_form model on the whole train split of
    :func:`tiny_shards` (a fixed batch), and :data:`BAD_STEP_RUN` on a copy with one corrupt row
    (``result["corrupt_id"]``), trained by 2 torchrun ranks in one job: ``{name: result}``."""
    root = tmp_path_factory.mktemp("property_runs")
    corrupt, bad_id = corrupt_shards(tiny_shards, root / "corrupt_shards")
    runs = [{"name": name, "shards": str(tiny_shards), "targets": ["e_form"],
             "model": tiny_model(), **spec}
            for name, spec in ((n, dict(s)) for n, s in MATRIX_SPECS.items())]
    runs.append({"shards": str(corrupt), "targets": ["e_form"], "model": tiny_model(), **BAD_STEP_RUN})
    results = deepspeed_runs(runs, root / "out", env={"CFDIST_COMPILE_BACKEND": "aot_eager"})
    results[BAD_STEP_RUN["name"]]["corrupt_id"] = bad_id
    return results


# ---- one Ray cluster for the session's Ray Train runs and job submissions
# Ray Train (2.60) settings of the test cluster; see ray_cluster(). Measured on the 2-core machine
# (under the same load, a 9-step 2-worker run): 40-42 s with these, 48-51 s without.
RAY_TRAIN_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture(scope="session")
def ray_cluster() -> LocalCluster:
    """Two raylets (127.0.0.2 / .3, 2 CPUs each, with a dashboard for ``ray job submit``) started once
    for every test that runs Ray Train or submits a job: each such run connects to it (``ray_env``)
    instead of starting and ending a cluster of its own (~10-20 s each on 2 cores). Its workers get
    :data:`ENV` plus ``CFDIST_COMPILE_BACKEND=aot_eager`` (workers inherit the raylets' environment,
    not the driver's; only runs with model.compile read it). Ended, and checked gone, at session end.

    Two Ray Train settings of this test cluster (:data:`RAY_TRAIN_TEST_ENV`) shorten every run:
    the controller polls its workers every 0.2 s instead of 2 s (a finished or killed worker group is
    noticed up to 2 s sooner, at each start, restart and end of a run), and Ray Train's preemption
    watcher (a Ray Core node-drain poller, one more actor process per worker group; cfdist's
    preemption is its own signal handling, cfdist.run.preempt) is not started."""
    with local_cluster(nodes=2, num_cpus=2,
                       env={**ENV, "CFDIST_COMPILE_BACKEND": "aot_eager", **RAY_TRAIN_TEST_ENV}) as cluster:
        yield cluster


def ray_env(cluster: LocalCluster) -> dict[str, str]:
    """The environment under which ``cfdist pretrain`` / ``finetune`` (cfdist.run.ray_cluster.init_ray)
    joins ``cluster``."""
    return {"RAY_ADDRESS": cluster.gcs_address}

