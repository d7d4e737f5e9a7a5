"""The Crystalformer model: parameter count, T-Fixup init, sigma statistics, predict, batching."""

from __future__ import annotations

import copy

import math

import numpy as np
import pytest
import torch

from cfdist import Crystalformer, CrystalformerConfig, collate, count_parameters, image_table
from cfdist.crystal import InvalidCrystalError, to_pymatgen
from cfdist.config import ConfigError

from conftest import freeze_sigma_stats


def batch_of(crystals, model, target_names=None):
    return collate(crystals, [image_table(c.lattice, c.positions, model.cutoff) for c in crystals], target_names)


def test_parameter_counts():
    assert count_parameters(Crystalformer()) == 853_505  # reference: 853,517 incl. 12 frozen scalars
    assert count_parameters(Crystalformer(CrystalformerConfig(n_basis=0))) == 820_737  # simplified
    per_block = count_parameters(Crystalformer().blocks[0])
    assert per_block == 206_080
    assert count_parameters(Crystalformer(CrystalformerConfig(n_blocks=7))) == 853_505 + 3 * per_block


def test_t_fixup_init_scales():
    torch.manual_seed(0)
    model = Crystalformer()
    cfg = model.config
    assert model.embedding.weight.std().item() == pytest.approx(128**-0.5 * 36**-0.25, rel=0.03)  # 0.0361
    scale = 0.67 * 4**-0.25
    att = model.blocks[0].attention
    xavier = math.sqrt(6 / (128 + 128)) / math.sqrt(3)  # std of xavier-uniform, 128x128
    assert att.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.03)
    assert att.v_proj.weight.std().item() == pytest.approx(xavier * scale, rel=0.03)
    assert att.out_proj.weight.std().item() == pytest.approx(xavier * scale, rel=0.03)
    ffn_xavier = math.sqrt(6 / (128 + 512)) / math.sqrt(3)
    assert model.blocks[0].ffn[0].weight.std().item() == pytest.approx(ffn_xavier * scale, rel=0.03)
    assert att.sigma_weight.std().item() == pytest.approx(0.25, rel=0.15)
    edge_std = 0.125 * math.sqrt(6 / (128 + 64)) / math.sqrt(3)
    assert att.edge_proj.std().item() == pytest.approx(edge_std, rel=0.03)
    assert all(b.attention.q_proj.bias.abs().max() == 0 for b in model.blocks)
    assert cfg.n_targets == 1 and model.target_std.item() == 1.0


def test_sigma_is_bounded_for_any_input():
    model = Crystalformer().double().eval()  # eval: the frozen statistics (0, 1) are used as-is
    att = model.blocks[0].attention
    q = torch.randn(64, 8, 16, dtype=torch.float64) * torch.logspace(-3, 4, 64, dtype=torch.float64)[:, None, None]
    q = torch.cat([q, -q])
    sigma = torch.sqrt(-0.5 / att.exponent(q))
    bound = 1.4 / math.sqrt(0.5)
    assert (sigma > 0).all() and (sigma <= bound * (1 + 1e-12)).all()
    assert sigma.max().item() == pytest.approx(bound, rel=1e-9)  # x -> -inf reaches the bound
    x = torch.tensor([-1e4, 0.0, 1e4], dtype=torch.float64)
    rho = 0.5 * torch.nn.functional.elu(0.2 * x) + 1
    assert rho.min().item() >= 0.5 and rho[1].item() == 1.0


def test_sigma_stats_set_by_the_explicit_pass_and_never_by_a_forward(megnet_crystals):
    torch.manual_seed(0)
    model = Crystalformer(CrystalformerConfig(n_blocks=2))
    crystals = megnet_crystals[:6]
    batch = batch_of(crystals, model)
    for mode in (model.eval, model.train):  # neither inference nor training forwards set them
        mode()
        model(batch).sum().backward()
        assert not model.sigma_stats_ready
        assert all(b.attention.sigma_mean.item() == 0 and b.attention.sigma_std.item() == 1 for b in model.blocks)
    model.fit_sigma_statistics(batch)
    assert model.sigma_stats_ready
    first = [(b.attention.sigma_mean.item(), b.attention.sigma_std.item()) for b in model.blocks]
    # Layer 0's statistics are the pooled mean / unbiased std of s = q . w over all atoms and heads.
    att = model.blocks[0].attention
    x = model.embed(batch, torch.float32)
    q = att.q_proj(x).view(-1, 8, 16)
    s = (q * att.sigma_weight).sum(-1).detach().double()
    assert first[0][0] == pytest.approx(s.mean().item(), rel=1e-5)
    assert first[0][1] == pytest.approx(s.std(unbiased=True).item(), rel=1e-5)
    # Layer 1's are those of block 0's output computed with block 0's fitted statistics.
    with torch.no_grad():
        geometry = model.geometry(batch, torch.float32)
        x1 = model.blocks[0](x, geometry, model.attention_backend)
        s1 = model.blocks[1].attention.score(model.blocks[1].attention.project(x1)[0]).double()
    assert first[1][0] == pytest.approx(s1.mean().item(), rel=1e-6)
    assert first[1][1] == pytest.approx(s1.std(unbiased=True).item(), rel=1e-6)
    model(batch_of(megnet_crystals[10:14], model)).sum().backward()  # a training step changes nothing
    assert first == [(b.attention.sigma_mean.item(), b.attention.sigma_std.item()) for b in model.blocks]
    state = model.state_dict()
    assert "blocks.0.attention.sigma_mean" in state and not any(k.endswith("sigma_ready") for k in state)


def test_sigma_stats_equal_those_the_first_training_forward_set(megnet_crystals):
    """The explicit pass sets the numbers the lazy first training forward of cfdist 0.1.0 set:
    emulated here by running each block's scores through the same reduction as the forward goes."""
    torch.manual_seed(0)
    model = Crystalformer(CrystalformerConfig(n_blocks=3)).double()
    batch = batch_of(megnet_crystals[:8], model).to(dtype=torch.float64)
    lazy = copy.deepcopy(model).train()
    geometry = lazy.geometry(batch, torch.float64)
    x = lazy.embed(batch, torch.float64)
    for block in lazy.blocks:  # what the first training forward did, block by block, inside the forward
        att = block.attention
        score = att.score(att.project(x)[0]).detach().double().reshape(-1)
        mean = score.mean()
        att.sigma_mean.fill_(float(mean))
        att.sigma_std.fill_(float(((score - mean) ** 2).sum() / (score.numel() - 1)) ** 0.5)
        x = block(x, geometry, lazy.attention_backend)
    model.fit_sigma_statistics(batch)
    for a, b in zip(model.blocks, lazy.blocks):
        assert a.attention.sigma_mean.item() == pytest.approx(b.attention.sigma_mean.item(), rel=1e-12)
        assert a.attention.sigma_std.item() == pytest.approx(b.attention.sigma_std.item(), rel=1e-12)


def test_sigma_stats_all_reduce_pools_across_ranks(megnet_crystals):
    """An all_reduce that sums (count, sum, sum of squares) over 'ranks' gives pooled statistics;
    a rank without a batch joins every reduction with zeros."""
    torch.manual_seed(0)
    model = Crystalformer(CrystalformerConfig(n_blocks=1)).train()
    other_rank = torch.tensor([100.0, 50.0, 400.0], dtype=torch.float64)
    seen = []

    def fake_two_rank_sum(stats):
        seen.append(stats.clone())
        return stats + other_rank

    model.fit_sigma_statistics(batch_of(megnet_crystals[:3], model), all_reduce=fake_two_rank_sum)
    count, total, total_sq = (seen[0] + other_rank).tolist()
    mean = total / count
    att = model.blocks[0].attention
    assert att.sigma_mean.item() == pytest.approx(mean)
    assert att.sigma_std.item() == pytest.approx(math.sqrt((total_sq - count * mean**2) / (count - 1)), rel=1e-6)
    idle = Crystalformer(CrystalformerConfig(n_blocks=2))
    idle.fit_sigma_statistics(None, all_reduce=lambda stats: (seen.append(stats.clone()), stats + other_rank)[1])
    assert len(seen) == 3 and not seen[1].any() and not seen[2].any()
    assert idle.blocks[1].attention.sigma_mean.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no finite attention score on any rank"):
        idle.fit_sigma_statistics(None, all_reduce=lambda stats: stats)


def test_sigma_stats_leave_out_a_corrupt_structure_in_the_first_batch(megnet_crystals):
    """NaN positions make a structure's scores NaN from the second block on: they are left out of
    the sums (the statistics stay finite), and the first block (scores from the embedding alone,
    no geometry) gets exactly the statistics of the clean batch."""
    torch.manual_seed(0)
    clean_model = Crystalformer(CrystalformerConfig(n_blocks=3)).train()
    model = copy.deepcopy(clean_model)
    clean = batch_of(megnet_crystals[:4], model)
    corrupt = batch_of(megnet_crystals[:4], model)
    corrupt.positions[corrupt.atom_crystal == 1] = float("nan")
    clean_model.fit_sigma_statistics(clean)
    model.fit_sigma_statistics(corrupt)
    stats = [(b.attention.sigma_mean.item(), b.attention.sigma_std.item()) for b in model.blocks]
    assert all(math.isfinite(m) and math.isfinite(sd) and sd > 0 for m, sd in stats), stats
    first = clean_model.blocks[0].attention
    assert stats[0] == (first.sigma_mean.item(), first.sigma_std.item())
    assert stats[1] != (clean_model.blocks[1].attention.sigma_mean.item(),
                        clean_model.blocks[1].attention.sigma_std.item())  # fitted without crystal 1's atoms
    with pytest.raises(ValueError, match="non-finite positions"):
        everything = batch_of(megnet_crystals[:2], model)
        everything.positions[:] = float("nan")
        Crystalformer(CrystalformerConfig(n_blocks=2)).fit_sigma_statistics(everything)


def test_predict_accepts_structures_atoms_and_crystals_in_model_dtype(model64, megnet_crystals):
    from pymatgen.io.ase import AseAtomsAdaptor

    crystals = megnet_crystals[:5]
    structures = [to_pymatgen(c) for c in crystals]
    atoms = [AseAtomsAdaptor.get_atoms(s) for s in structures]
    from_crystals = model64.predict(crystals)
    assert from_crystals.shape == (5, 1) and from_crystals.dtype == torch.float64
    assert torch.allclose(model64.predict(structures), from_crystals, rtol=1e-12, atol=1e-14)
    assert torch.allclose(model64.predict(atoms), from_crystals, rtol=1e-12, atol=1e-14)
    assert model64.float().predict(structures).dtype == torch.float32


def test_predict_denormalises_and_keeps_training_mode(megnet_crystals):
    torch.manual_seed(0)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(n_blocks=1, target_names=["a", "b"])))
    raw = model.predict(megnet_crystals[:3])
    assert raw.shape == (3, 2)
    model.target_mean.copy_(torch.tensor([1.0, -2.0]))
    model.target_std.copy_(torch.tensor([2.0, 0.5]))
    model.train()
    scaled = model.predict(megnet_crystals[:3])
    assert model.training
    assert torch.allclose(scaled, raw * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -2.0]), atol=1e-6)


def test_predict_rejects_bad_structures_with_a_clear_error(model64):
    from pymatgen.core import Lattice, Structure

    bad = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]])
    with pytest.raises(InvalidCrystalError, match="closer than 0.5"):
        model64.predict([bad])


def test_batch_composition_and_order_do_not_leak(model64, megnet_crystals):
    crystals = megnet_crystals[20:26]
    alone = torch.cat([model64.predict([c]) for c in crystals])
    together = model64.predict(crystals)
    reordered = model64.predict(crystals[::-1]).flip(0)
    chunked = model64.predict(crystals, batch_size=4)
    for got in (together, reordered, chunked):
        assert torch.allclose(got, alone, rtol=1e-10, atol=1e-13)


def test_simplified_model_and_multi_target_training_step(megnet_crystals):
    torch.manual_seed(0)
    model = Crystalformer(CrystalformerConfig(n_basis=0, n_blocks=2, target_names=["e_form", "gap"]))
    assert all(b.attention.edge_proj is None for b in model.blocks)
    batch = batch_of(megnet_crystals[:8], model)
    out = model(batch)
    assert out.shape == (8, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_training_reduces_loss_on_a_fixed_batch(megnet_crystals):
    torch.manual_seed(0)
    model = Crystalformer(CrystalformerConfig(n_blocks=2, target_names=["e_form"]))
    batch = batch_of(megnet_crystals[:16], model, ["e_form"])
    y = batch.labels.float()
    y = (y - y.mean()) / y.std()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98))
    losses = []
    for _ in range(30):
        loss = (model(batch) - y).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_activation_checkpointing_gives_identical_gradients(megnet_crystals):
    torch.manual_seed(0)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(n_blocks=2))).train()
    batch = batch_of(megnet_crystals[:6], model)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        model(batch).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    # Same math; only float32 rounding may differ. The key bias has an exactly-zero gradient
    # (softmax shift invariance), so its entries are pure rounding noise: use a global scale.
    scale = max(g.abs().max().item() for g in grads[0])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-7 * scale)


def test_forces_from_position_gradients_are_finite(model64, megnet_crystals):
    batch = batch_of(megnet_crystals[:2], model64)
    batch.positions.requires_grad_(True)
    model64(batch).sum().backward()
    assert torch.isfinite(batch.positions.grad).all() and batch.positions.grad.abs().sum() > 0


def test_model_refuses_tables_built_with_a_smaller_cutoff(model64, megnet_crystals):
    c = megnet_crystals[0]
    batch = collate([c], [image_table(c.lattice, c.positions, 5.0)])
    with pytest.raises(ValueError, match="cutoff 5.0000 A but the model needs 8.9095 A"):
        model64(batch)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("n_blocks: 4\nn_head: 8\n")
    with pytest.raises(ConfigError, match="unknown key.*'n_head'.*did you mean 'n_heads'"):
        CrystalformerConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="divisible"):
        CrystalformerConfig(d_model=100, n_heads=8)
    path.write_text("n_blocks: 7\ntarget_names: [e_form, gap]\n")
    cfg = CrystalformerConfig.from_yaml(path)
    assert cfg.n_blocks == 7 and cfg.n_targets == 2


def test_shipped_model_configs_load():
    from cfdist.config import packaged_configs

    names = packaged_configs("model")
    assert {"crystalformer", "crystalformer_7blocks", "crystalformer_simplified"} <= set(names)
    for name in names:
        model = Crystalformer(CrystalformerConfig.from_yaml(name))
        assert count_parameters(model) > 0
    assert CrystalformerConfig.from_yaml("crystalformer") == CrystalformerConfig()


def test_collate_offsets_and_labels(megnet_crystals, model64):
    crystals = megnet_crystals[:3]
    batch = batch_of(crystals, model64, ["e_form", "missing"])
    sizes = [c.n_atoms for c in crystals]
    assert batch.positions.shape == (sum(sizes), 3)
    assert batch.n_atoms.tolist() == sizes
    offset = 0
    start = 0
    for c in crystals:
        t = image_table(c.lattice, c.positions, model64.cutoff)
        np.testing.assert_array_equal(batch.entry_i[start:start + len(t)].numpy(), t.i + offset)
        np.testing.assert_array_equal(batch.entry_j[start:start + len(t)].numpy(), t.j + offset)
        offset += c.n_atoms
        start += len(t)
    assert batch.labels.shape == (3, 2) and torch.isnan(batch.labels[:, 1]).all()
    assert batch.labels[:, 0].tolist() == [c.labels["e_form"] for c in crystals]
