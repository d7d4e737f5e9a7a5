"""The one step and the one evaluation (cfdist.run.step, cfdist.run.evaluation) against float64
references written out here: losses, per-component sums, gradient accumulation over packed
micro-batches, and the metrics every loop and ``cfdist evaluate`` report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import CUTOFF, energy_model, freeze_sigma_stats

TINY = {"n_blocks": 2, "d_model": 16, "n_heads": 2, "d_ff": 32, "n_basis": 8, "head_hidden": 16}


def property_model(targets=("e_form",), seed=0):
    from cfdist import Crystalformer, CrystalformerConfig

    torch.manual_seed(seed)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(target_names=list(targets), cutoff_sigmas=4.4,
                                                                 **TINY)), seed).double()
    model.target_mean.fill_(-1.2)
    model.target_std.fill_(0.7)
    return model


def shard_batch(shard_dir, split="train", rows=None, labels=("e_form",)):
    import pyarrow as pa

    from cfdist.manifest import ShardSet
    from cfdist.shards import collate_arrow, read_shard

    table = pa.concat_tables([read_shard(e.path) for e in ShardSet(shard_dir).files(split)])
    if rows is not None:
        table = table.slice(*rows)
    return collate_arrow(table, list(labels), cutoff=CUTOFF)


def with_gaps(batch):
    """Two targets, the second missing (NaN) on every third crystal."""
    second = batch.labels[:, :1] * 0.5 + 1.0
    second[::3] = float("nan")
    batch.labels = torch.cat([batch.labels, second], 1)
    return batch


def test_property_step_is_the_masked_l1_on_standardised_targets(shard_dir):
    from cfdist.run.objective import PropertyObjective
    from cfdist.run.step import eval_step, train_step

    model = property_model(("e_form", "other")).train()
    batch = with_gaps(shard_batch(shard_dir, rows=(0, 10)))
    objective = PropertyObjective(["e_form", "other"])
    counts = objective.label_counts(batch)
    assert counts == [10.0, 6.0]

    result = train_step(model, batch, objective, counts, world=1)
    with torch.no_grad():
        pred = model(batch).double()
    y = batch.labels.double()
    mask = torch.isfinite(y)
    norm_err = torch.where(mask, (pred - (torch.nan_to_num(y) + 1.2) / 0.7).abs(), torch.zeros_like(pred))
    orig_err = torch.where(mask, (pred * 0.7 - 1.2 - torch.nan_to_num(y)).abs(), torch.zeros_like(pred))
    assert float(result.loss_share) == pytest.approx(float(norm_err.sum() / mask.sum()), rel=1e-6)
    np.testing.assert_allclose(result.sums[0].numpy(), orig_err.sum(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(result.sums[1].numpy(), norm_err.sum(0).numpy(), rtol=1e-6)
    assert result.sums[2].tolist() == [10.0, 6.0]
    np.testing.assert_allclose(result.sums[3].numpy(), (orig_err ** 2).sum(0).numpy(), rtol=1e-6)
    labels = torch.where(mask, y, torch.zeros_like(y))
    np.testing.assert_allclose(result.sums[4].numpy(), labels.sum(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(result.sums[5].numpy(), (labels ** 2).sum(0).numpy(), rtol=1e-12)

    # evaluation: float64 throughout, equal to the reference to rounding
    stats = eval_step(model.eval(), batch, objective)
    np.testing.assert_allclose(stats[0].numpy(), orig_err.sum(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(stats[1].numpy(), norm_err.sum(0).numpy(), rtol=1e-12)


def test_packed_micro_batches_accumulate_to_the_whole_step(shard_dir):
    """Micro-batches scaled by the step's label count give the gradient of the whole batch
    (what both loops rely on when a step is packed into several micro-batches or ranks)."""
    from cfdist.run.objective import PropertyObjective
    from cfdist.run.step import train_step

    objective = PropertyObjective(["e_form", "other"])
    batch = with_gaps(shard_batch(shard_dir, rows=(0, 12)))
    parts = [with_gaps(shard_batch(shard_dir, rows=(0, 5))), with_gaps(shard_batch(shard_dir, rows=(5, 7)))]
    # with_gaps masks every third row of each part: rebuild the whole batch's labels to match
    batch.labels = torch.cat([p.labels for p in parts])
    grads, losses = [], []
    for pieces in ([batch], parts):
        model = property_model(("e_form", "other")).train()
        counts = [sum(c) for c in zip(*(objective.label_counts(p) for p in pieces))]
        losses.append(sum(float(train_step(model, p, objective, counts, world=1).loss_share) for p in pieces))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]["head.0.weight"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12, msg=name)

    # two ranks: each scales by world / global count; the average of their gradients is the whole step's
    model = property_model(("e_form", "other")).train()
    counts = [sum(c) for c in zip(*(objective.label_counts(p) for p in parts))]
    for part in parts:
        train_step(model, part, objective, counts, world=2)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad / 2, grads[0][name], rtol=1e-9, atol=1e-12, msg=name)


def test_energy_step_sums_and_loss_per_component(megnet_crystals):
    from cfdist.batch import collate
    from cfdist.geometry import image_table
    from cfdist.run.objective import EV_PER_A3_IN_GPA, EnergyObjective, elementwise_loss
    from cfdist.run.step import eval_step, train_step
    from cfdist.train.config import LossSection

    model = energy_model(seed=3).train()
    crystals = megnet_crystals[:4]
    batch = collate(crystals, [image_table(c.lattice, c.positions, model.cutoff) for c in crystals])
    rng = np.random.default_rng(0)
    n_atoms = batch.n_atoms.double()
    batch.labels = (torch.from_numpy(rng.normal(-4.0, 0.3, size=(4, 1))) * n_atoms[:, None])
    batch.labels[2, 0] = float("nan")
    batch.forces = torch.from_numpy(rng.normal(scale=0.1, size=(int(n_atoms.sum()), 3)))
    batch.forces[:2] = float("nan")
    batch.stress = torch.from_numpy(rng.normal(scale=0.01, size=(4, 3, 3)))
    loss_section = LossSection(energy_weight=1.0, forces_weight=2.0, stress_weight=0.1, kind="huber", huber_delta=0.1)
    objective = EnergyObjective(loss_section)
    counts = objective.label_counts(batch)
    assert counts == [3.0, float(3 * n_atoms.sum() - 6), 36.0]

    result = train_step(model, batch, objective, counts, world=1)
    out = model(batch, forces=True, stress=True)
    refs = {"energy": (out.energy.detach() / n_atoms, batch.labels[:, 0] / n_atoms, 1000.0),
            "forces": (out.forces.detach(), batch.forces, 1000.0),
            "stress": (out.stress.detach() * EV_PER_A3_IN_GPA, batch.stress * EV_PER_A3_IN_GPA, 1.0)}
    expected_loss = 0.0
    for k, (name, (pred, label, scale)) in enumerate(refs.items()):
        mask = torch.isfinite(label)
        res = (pred - label)[mask]
        terms = elementwise_loss(res, "huber", 0.1)
        assert float(result.sums[0, k]) == pytest.approx(float(res.abs().sum()) * scale, rel=1e-9), name
        assert float(result.sums[1, k]) == pytest.approx(float(terms.sum()), rel=1e-9), name
        assert float(result.sums[2, k]) == counts[k]
        expected_loss += objective.weights[name] * float(terms.mean())
    assert float(result.loss_share) == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(eval_step(model.eval(), batch, objective), result.sums, rtol=1e-9, atol=1e-12)


def test_evaluation_of_a_split_matches_numpy(shard_dir):
    """evaluate + metrics + target_report (what validation, fine-tuning's test split and cfdist
    evaluate report) against numpy on the model's predictions; the budget's packing and the
    number of ranks (blocks of the split) do not change the numbers."""
    from cfdist.data import BatchBudget
    from cfdist.manifest import ShardSet
    from cfdist.run import evaluation
    from cfdist.run.objective import PropertyObjective

    shards = ShardSet(shard_dir)
    model = property_model().eval()
    objective = PropertyObjective(["e_form"])
    batch = shard_batch(shard_dir, "train")
    with torch.no_grad():
        pred = (model(batch).double() * 0.7 - 1.2).squeeze(1).numpy()
    y = batch.labels.double().squeeze(1).numpy()
    err = pred - y

    reports = []
    for budget, world in ((BatchBudget(), 1), (BatchBudget(max_structures=3), 1), (BatchBudget(max_entries=2000), 3)):
        totals = sum(evaluation.evaluate(model, evaluation.split_batches(shards, "train", ["e_form"], budget,
                                                                        rank=r, world=world), objective, "cpu")
                     for r in range(world))
        reports.append((evaluation.target_report(objective, totals)["e_form"], evaluation.metrics(objective, totals)))
    for report, metrics in reports:
        assert report["n"] == 48
        assert report["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-12)
        assert report["rmse"] == pytest.approx(math.sqrt((err ** 2).mean()), rel=1e-12)
        assert report["r2"] == pytest.approx(1 - (err ** 2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-9)
        assert metrics["val_mae/e_form"] == report["mae"]
        assert metrics["val_loss"] == pytest.approx(np.abs(err).mean() / 0.7, rel=1e-12)
    assert evaluation.target_report(objective, torch.zeros(6, 1))["e_form"] == {"n": 0, "mae": None, "rmse": None,
                                                                                "r2": None}
