"""Invariances of the model (docs/model.md, Invariances), via cfdist.testing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfdist import CrystalformerConfig, Crystalformer, collate, image_table
from cfdist.testing import (
    assert_invariant, change_basis, permute_atoms, random_crystal, rigid_motion, shift_by_lattice,
    standard_transforms, supercell,
)

from conftest import freeze_sigma_stats


@pytest.mark.parametrize("seed,n_atoms", [(0, 1), (1, 2), (2, 3), (3, 5)])
def test_random_cells_are_invariant(model64, seed, n_atoms):
    rng = np.random.default_rng(seed)
    crystal = random_crystal(rng, n_atoms, skew=0.35, id=f"random-{seed}")
    assert_invariant(model64.predict, crystal, standard_transforms(crystal, rng), rtol=1e-6)


def test_real_structures_are_invariant(model64, megnet_slice_crystals):
    rng = np.random.default_rng(7)
    by_size = sorted(megnet_slice_crystals[:400], key=lambda c: c.n_atoms)
    chosen = [by_size[0], by_size[len(by_size) // 3], by_size[2 * len(by_size) // 3], by_size[-1]]
    for crystal in chosen:
        transforms = standard_transforms(crystal, rng)
        if crystal.n_atoms > 8:  # keep the 8x supercell of large cells out of the suite's time budget
            transforms.pop("supercell 2x2x2")
        assert_invariant(model64.predict, crystal, transforms, rtol=1e-6)


def test_simplified_model_is_invariant(megnet_crystals):
    torch.manual_seed(1)
    model = freeze_sigma_stats(Crystalformer(CrystalformerConfig(n_basis=0))).double().eval()
    crystal = megnet_crystals[3]
    rng = np.random.default_rng(0)
    assert_invariant(model.predict, crystal, standard_transforms(crystal, rng), rtol=1e-6)


def test_per_atom_states_follow_supercell_and_permutation(model64, megnet_crystals):
    crystal = megnet_crystals[1]
    n = crystal.n_atoms

    def states(c):
        return model64.encode(collate([c], [image_table(c.lattice, c.positions, model64.cutoff)]))

    base = states(crystal)
    big = states(supercell(crystal, np.diag([2, 1, 1])))
    assert torch.allclose(big[:n], base, rtol=1e-9, atol=1e-12)
    assert torch.allclose(big[n:], base, rtol=1e-9, atol=1e-12)
    perm = np.random.default_rng(0).permutation(n)
    assert torch.allclose(states(permute_atoms(crystal, perm)), base[perm], rtol=1e-9, atol=1e-12)


def test_helpers_detect_a_model_that_is_not_invariant(megnet_crystals):
    """The helper must fail for a quantity that depends on the cell choice (sum instead of mean)."""
    crystal = megnet_crystals[0]

    def cell_dependent(crystals):
        return torch.tensor([[float(c.n_atoms)] for c in crystals], dtype=torch.float64)

    with pytest.raises(AssertionError, match="supercell 2x1x1"):
        assert_invariant(cell_dependent, crystal, {"supercell 2x1x1": lambda c: supercell(c, np.diag([2, 1, 1]))})

    def frame_dependent(crystals):
        return torch.tensor([[c.positions[0, 0]] for c in crystals], dtype=torch.float64)

    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    with pytest.raises(AssertionError, match="rotation"):
        assert_invariant(frame_dependent, crystal, {"rotation": lambda c: rigid_motion(c, rotation, [1.0, 0, 0])})


def test_transforms_preserve_the_crystal(megnet_crystals):
    """Sanity of the helpers themselves: volume, composition and image-table sizes."""
    crystal = megnet_crystals[2]
    cutoff = 6.0
    per_atom = len(image_table(crystal.lattice, crystal.positions, cutoff)) / crystal.n_atoms
    m = np.array([[1, 1, 0], [-1, 1, 0], [0, 1, 2]])
    for c, volume_factor in [(supercell(crystal, m), 4), (change_basis(crystal, [[1, 2, 0], [0, 1, 0], [0, 0, 1]]), 1),
                             (shift_by_lattice(crystal, np.ones((crystal.n_atoms, 3), int)), 1)]:
        assert c.volume == pytest.approx(volume_factor * crystal.volume)
        assert c.n_atoms == volume_factor * crystal.n_atoms
        assert len(image_table(c.lattice, c.positions, cutoff)) / c.n_atoms == per_atom


def test_reference_box_rule_is_only_approximately_invariant(model64, megnet_crystals):
    """The same checks catch the dense-box truncation of the reference (docs/model.md, Invariances)."""
    from cfdist.ops.dense_box import DenseBoxGeometry, dense_box_attention

    class DenseBox:
        def prepare(self, batch, cfg, dtype):
            return DenseBoxGeometry.build(batch, 2, cfg.n_basis, cfg.gbf_r_max, cfg.gbf_width_scale, dtype)

        def __call__(self, q, k, v, a, geometry, edge_proj):
            return dense_box_attention(q, k, v, a, geometry, edge_proj)

    model64.attention_backend = DenseBox()
    crystal = megnet_crystals[5]
    wrap = np.random.default_rng(0).integers(-2, 3, size=(crystal.n_atoms, 3))
    with pytest.raises(AssertionError, match="wrapping"):
        assert_invariant(model64.predict, crystal, {"wrapping": lambda c: shift_by_lattice(c, wrap)}, rtol=1e-6)
