"""Checkpoints load with ``torch.load(weights_only=True)``: a shared file cannot run code, and
checkpoints written by earlier cfdist versions still load."""

from __future__ import annotations

import json
import os

import pytest
import torch

from paths import FIXTURES, require


class _RunsCode:
    """Unpickling this object runs a shell command (what a malicious checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_of_cfdist_0_1_0_still_loads_and_predicts():
    """tests/data/portable_cfdist-0.1.0_tiny.pt was written by cfdist 0.1.0 (commit 77be704)."""
    import cfdist
    from cfdist.crystal import from_jarvis

    model = cfdist.load(require(FIXTURES / "portable_cfdist-0.1.0_tiny.pt"))
    assert model.config.target_names == ["e_form"] and model.checkpoint_info["extra"]["run_name"] == "tiny"
    records = json.loads(require(FIXTURES / "megnet_64.json").read_text())[:3]
    values = model.predict([from_jarvis(r["atoms"], id=r["id"]) for r in records]).flatten().tolist()
    # the values cfdist 0.1.0 predicted with this checkpoint when it was written
    assert values == pytest.approx([-1.438355803489685, -1.2857218980789185, -1.1756221055984497], rel=1e-5)


def test_a_checkpoint_carrying_code_is_refused_before_it_runs(tmp_path):
    import cfdist
    from cfdist.checkpoint import UnsafeCheckpointError, load_checkpoint_file

    good = torch.load(require(FIXTURES / "portable_cfdist-0.1.0_tiny.pt"), weights_only=True)
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({**good, "extra": {"note": _RunsCode(marker)}}, evil)
    with pytest.raises(UnsafeCheckpointError, match="refused to load.*can run code"):
        cfdist.load(evil)
    with pytest.raises(UnsafeCheckpointError, match=str(evil)):
        load_checkpoint_file(evil)  # the resume state (last.pt) goes through the same door
    assert not marker.exists(), "the payload ran"
