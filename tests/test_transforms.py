"""Per-target output transforms: ``softplus`` predictions are never negative, ``log`` targets are
learnt in log10 space and predicted positive; configs reject unknown transforms; transfer copies a
head row only into the same transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import freeze_sigma_stats

TINY = {"n_blocks": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_basis": 8, "head_hidden": 16}


def model_with(transforms, targets=("gap", "k", "e")):
    from cfdist import Crystalformer, CrystalformerConfig

    torch.manual_seed(0)
    cfg = CrystalformerConfig(target_names=list(targets), target_transforms=transforms, **TINY)
    return freeze_sigma_stats(Crystalformer(cfg).double(), seed=1)


def test_config_rejects_unknown_transform_and_target():
    from cfdist.config import ConfigError, CrystalformerConfig
    from cfdist.finetune.config import load_finetune_config

    with pytest.raises(ConfigError, match="choose one of"):
        CrystalformerConfig(target_names=["gap"], target_transforms={"gap": "relu"})
    with pytest.raises(ConfigError, match="not a target"):
        CrystalformerConfig(target_names=["gap"], target_transforms={"gapp": "softplus"})
    with pytest.raises(ConfigError, match="data.transforms"):
        load_finetune_config("megnet_slice_eform", ["data.transforms={e_form: exp}"]).model_config()
    cfg = load_finetune_config("megnet_slice_eform", ["data.transforms={e_form: softplus}"]).model_config()
    assert cfg.target_transforms == {"e_form": "softplus"} and cfg.transform_of("e_form") == "softplus"


def test_softplus_predictions_are_never_negative(megnet_crystals):
    """A head pushed far below zero: identity predicts negative values, softplus >= 0 (exactly,
    after de-normalisation), and far above zero softplus is the identity."""
    model = model_with({"gap": "softplus"})
    plain = model_with({})
    with torch.no_grad():
        model.target_mean.copy_(torch.tensor([1.2, 0.0, -1.0], dtype=torch.float64))
        model.target_std.copy_(torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64))
        model.head[2].bias.fill_(-40.0)
    plain.load_state_dict(model.state_dict())
    low, low_plain = model.predict(megnet_crystals[:8]), plain.predict(megnet_crystals[:8])
    assert (low[:, 0] >= 0).all() and (low_plain[:, 0] < -20).all()
    assert torch.equal(low[:, 1:], low_plain[:, 1:])  # the other targets are untouched
    with torch.no_grad():
        model.head[2].bias.fill_(+40.0)
    plain.load_state_dict(model.state_dict())
    high, high_plain = model.predict(megnet_crystals[:8]), plain.predict(megnet_crystals[:8])
    # far above zero softplus is the identity: s * softplus(h + m / s) = s h + m + s log1p(exp(-(h + m/s)))
    assert (high_plain[:, 0] > 40).all() and torch.allclose(high[:, 0], high_plain[:, 0], rtol=1e-12, atol=1e-12)
    # gradients flow through the transform
    from cfdist.batch import collate
    from cfdist.geometry import image_table

    batch = collate(megnet_crystals[:4], [image_table(c.lattice, c.positions, model.cutoff) for c in
                                          megnet_crystals[:4]])
    with torch.no_grad():
        model.head[2].bias.zero_()
    model(batch)[:, 0].sum().backward()
    assert model.head[2].bias.grad[0] != 0


def test_log_target_learnt_in_log10_space(megnet_crystals):
    from cfdist.run.objective import PropertyObjective, log10_moments, normalised_targets

    model = model_with({"k": "log"})
    labels = torch.tensor([[1.0, 100.0, -0.5], [0.0, 0.0, 0.1], [2.0, float("nan"), 0.2]], dtype=torch.float64)
    space = model.label_space(labels)
    assert space[0, 1] == 2.0 and math.isnan(space[1, 1]) and math.isnan(space[2, 1])  # 0 -> missing
    assert torch.equal(space[:, [0, 2]], labels[:, [0, 2]])
    with torch.no_grad():
        model.target_mean[1], model.target_std[1] = 2.0, 0.5
    assert normalised_targets(model, labels)[0, 1] == 0.0
    assert model.denormalize(torch.zeros(1, 3, dtype=torch.float64))[0, 1] == pytest.approx(100.0)
    # a log target's labels <= 0 are not counted
    from cfdist.batch import collate
    from cfdist.geometry import image_table

    batch = collate(megnet_crystals[:3], [image_table(c.lattice, c.positions, model.cutoff) for c in
                                          megnet_crystals[:3]])
    batch.labels = labels
    assert PropertyObjective(["gap", "k", "e"], {"k": "log"}).label_counts(batch) == [3.0, 1.0, 3.0]
    # log-normal moment matching recovers log10 moments of a log-normal sample
    rng = np.random.default_rng(0)
    y = 10 ** rng.normal(1.5, 0.3, 200_000)
    mean, std = log10_moments(float(y.mean()), float(y.std()))
    assert mean == pytest.approx(1.5, abs=5e-3) and std == pytest.approx(0.3, abs=5e-3)
    with pytest.raises(ValueError, match="positive labels"):
        log10_moments(-1.0, 1.0, "k")


def test_transfer_copies_rows_only_under_the_same_transform(tmp_path):
    from cfdist.checkpoint import save_portable
    from cfdist.config import ConfigError
    from cfdist.run.transfer import model_from_pretrained

    source = model_with({"gap": "softplus"}, targets=("gap", "k")).float()
    with torch.no_grad():
        source.target_mean.copy_(torch.tensor([1.0, 2.0]))
    path = save_portable(tmp_path / "model.pt", source)
    kept, report = model_from_pretrained(path, ["gap", "k"], "keep", transforms={"gap": "softplus"})
    assert report["copied_targets"] == ["gap", "k"] and kept.config.target_transforms == {"gap": "softplus"}
    auto, report = model_from_pretrained(path, ["gap", "k"], "auto", {"k": (1.0, 0.2)},
                                         transforms={"gap": "softplus", "k": "log"})
    assert report["copied_targets"] == ["gap"] and report["new_targets"] == ["k"]
    assert auto.target_mean.tolist() == [1.0, 1.0] and auto.log_mask.tolist() == [False, True]
    with pytest.raises(ConfigError, match="output transforms differ"):
        model_from_pretrained(path, ["gap", "k"], "keep")
