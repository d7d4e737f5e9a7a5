"""Shared fixtures: real structures from the committed data, float64 models with frozen sigma stats,
and a small shard directory.

Data (all in the repository): ``tests/data/megnet_64.json`` (64 real crystals; most tests need no
more) and the full example slice ``examples/data/megnet_slice.json.gz`` (3,909 crystals).
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from paths import FIXTURES, MEGNET_SLICE, require

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


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


TINY_ENERGY = {"energy": True, "n_blocks": 2, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_basis": 8,
               "head_hidden": 16, "target_names": []}


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
