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
