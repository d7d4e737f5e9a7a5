"""Shared fixtures: real structures from ../shared/data and float64 models with frozen sigma stats."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

DATA_DIR = Path(os.environ.get("CFDIST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MEGNET_SLICE = DATA_DIR / "megnet_slice.json.gz"


@pytest.fixture(scope="session")
def megnet_records() -> list[dict]:
    """The real MEGNet slice (3,909 Materials Project crystals), as JARVIS-style dicts."""
    assert MEGNET_SLICE.exists(), f"real data missing: {MEGNET_SLICE} (set CFDIST_SHARED_DATA)"
    with gzip.open(MEGNET_SLICE, "rt") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def megnet_crystals(megnet_records):
    from cfdist.crystal import from_jarvis

    return [from_jarvis(r["atoms"], id=r["id"], labels={"e_form": r["e_form"]}) for r in megnet_records]


def freeze_sigma_stats(model, seed: int = 0):
    """Set every layer's sigma statistics to fixed non-trivial values (as after a first batch)."""
    gen = torch.Generator().manual_seed(seed)
    for block in model.blocks:
        att = block.attention
        att.sigma_mean.fill_(float(torch.randn((), generator=gen)) * 0.1)
        att.sigma_std.fill_(0.5 + float(torch.rand((), generator=gen)))
        att.sigma_ready.fill_(True)
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


# ---- a small shard directory written without Ray (as preprocess/build_shards.py lays it out)
CUTOFF = 8.9095
TARGETS = ["e_form"]
N_CRYSTALS = 60
# (split, first row, stop row) of each shard file, in manifest order
LAYOUT = [("train", 0, 14), ("train", 14, 27), ("train", 27, 38), ("train", 38, 48), ("val", 48, 54),
          ("val", 54, 60)]


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def shard_dir(megnet_crystals, tmp_path_factory):
    """A shard directory like build_shards.py writes: DIR/<split>/part-NNNNNN.parquet + manifest.json."""
    from cfdist.geometry import image_table
    from cfdist.shards import SCHEMA_VERSION, crystals_to_arrow, shard_metadata, write_shard

    crystals = megnet_crystals[:N_CRYSTALS]
    tables = [image_table(c.lattice, c.positions, CUTOFF) for c in crystals]
    root = tmp_path_factory.mktemp("shards")
    shards, values = [], {}
    for chunk, (split, lo, hi) in enumerate(LAYOUT):
        rel = f"{split}/part-{chunk:06d}.parquet"
        arrow = crystals_to_arrow(crystals[lo:hi], tables[lo:hi], [f"megnet:{k}" for k in range(lo, hi)], TARGETS)
        # small row groups so reads and shuffles see several record batches per file
        write_shard(root / rel, arrow, shard_metadata(CUTOFF, TARGETS, chunk=chunk, split=split), row_group_size=4)
        shards.append({"file": rel, "split": split, "rows": hi - lo, "bytes": (root / rel).stat().st_size,
                       "sha256": _sha256(root / rel)})
        values.setdefault(split, []).extend(c.labels["e_form"] for c in crystals[lo:hi])
    manifest = {
        "schema_version": SCHEMA_VERSION, "cutoff": CUTOFF, "targets": TARGETS, "shards": shards,
        "splits": {s: len(v) for s, v in values.items()},
        "statistics": {"targets": {"e_form": {s: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                                  "count": len(v)} for s, v in values.items()}}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root
