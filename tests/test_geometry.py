"""Image tables: exactness against brute force, ordering, cutoff derivation, truncation error."""

from __future__ import annotations

import numpy as np
import pytest

from cfdist import CrystalformerConfig, table_cutoff
from cfdist.geometry import brute_force_image_table, image_table, interplanar_spacings


def assert_tables_equal(a, b):
    np.testing.assert_array_equal(a.i, b.i)
    np.testing.assert_array_equal(a.j, b.j)
    np.testing.assert_array_equal(a.n, b.n)


def random_lattice(rng, scale=4.0, skew=0.4):
    while True:
        lattice = scale * (np.eye(3) + skew * rng.normal(size=(3, 3)))
        if abs(np.linalg.det(lattice)) > 0.2 * scale**3:
            return lattice


@pytest.mark.parametrize("seed", range(6))
def test_random_cells_unwrapped_positions_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    lattice = random_lattice(rng)
    n = int(rng.integers(1, 6))
    # Positions far outside the cell: the table must not assume wrapped coordinates.
    positions = (rng.random((n, 3)) + rng.integers(-3, 4, size=(n, 3))) @ lattice
    assert_tables_equal(image_table(lattice, positions, 7.0), brute_force_image_table(lattice, positions, 7.0))


def test_strongly_skewed_cell():
    lattice = np.array([[3.0, 0.0, 0.0], [11.7, 0.4, 0.0], [-8.1, 5.3, 2.2]])  # angles far from 90 degrees
    assert interplanar_spacings(lattice).min() < 0.5
    positions = np.array([[0.1, 0.2, 0.3], [1.0, -0.3, 4.0], [25.0, 3.0, -7.0]])
    assert_tables_equal(image_table(lattice, positions, 6.0), brute_force_image_table(lattice, positions, 6.0))


def test_left_handed_lattice():
    rng = np.random.default_rng(3)
    lattice = random_lattice(rng)[[1, 0, 2]]
    if np.linalg.det(lattice) > 0:
        lattice = lattice[[1, 0, 2]]
    assert np.linalg.det(lattice) < 0
    positions = rng.random((3, 3)) @ lattice
    assert_tables_equal(image_table(lattice, positions, 6.5), brute_force_image_table(lattice, positions, 6.5))


def test_cell_much_smaller_than_cutoff_and_one_atom():
    lattice = np.diag([1.1, 1.3, 0.9]) + 0.2 * np.ones((3, 3))
    positions = np.array([[0.3, 0.1, -5.0]])
    table = image_table(lattice, positions, 8.9)
    assert_tables_equal(table, brute_force_image_table(lattice, positions, 8.9))
    # ~ (4/3) pi r^3 / V images of the single atom, the self image (0, 0, 0) among them.
    expected = 4 / 3 * np.pi * 8.9**3 / abs(np.linalg.det(lattice))
    assert 0.8 * expected < len(table) < 1.2 * expected
    assert np.any(np.all(table.n == 0, axis=1))


def test_thousand_atom_cell():
    rng = np.random.default_rng(7)
    lattice = 24.0 * (np.eye(3) + 0.1 * rng.normal(size=(3, 3)))
    positions = rng.random((1000, 3)) @ lattice + rng.integers(-1, 2, size=(1000, 3)) @ lattice
    cutoff = 5.0
    table = image_table(lattice, positions, cutoff)
    # Brute force on 1e6 pairs in Python is too slow: check the table against an
    # independent all-pairs numpy enumeration over a box that covers the sphere.
    frac = positions @ np.linalg.inv(lattice)
    shift = np.floor(frac)
    wrapped = positions - shift @ lattice
    box = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    assert (interplanar_spacings(lattice) > cutoff).all()  # so a +-1 box around wrapped atoms suffices
    rows = []
    for n in box:
        d = wrapped[None, :, :] + (n @ lattice) - wrapped[:, None, :]
        i, j = np.nonzero((d**2).sum(-1) <= cutoff**2)
        rows.append(np.column_stack([i, j, np.tile(n, (len(i), 1)) - shift[j] + shift[i]]))
    expected = np.concatenate(rows).astype(np.int64)
    expected = expected[np.lexsort(expected.T[::-1])]
    got = np.column_stack([table.i, table.j, table.n])
    np.testing.assert_array_equal(got, expected)
    d = table.distances(lattice, positions)
    assert d.max() <= cutoff and len(table) > 1000


def test_table_sorted_self_images_present_and_distances(rng):
    lattice = random_lattice(rng)
    positions = rng.random((4, 3)) @ lattice
    table = image_table(lattice, positions, 6.0)
    keys = np.column_stack([table.i, table.j, table.n])
    assert (np.diff(keys[np.lexsort(keys.T[::-1])], axis=0) != 0).any(axis=1).all()
    np.testing.assert_array_equal(keys, keys[np.lexsort(keys.T[::-1])])
    self_rows = (table.i == table.j) & np.all(table.n == 0, axis=1)
    assert self_rows.sum() == 4
    assert table.distances(lattice, positions)[self_rows].max() == 0.0
    assert table.i.dtype == table.j.dtype == table.n.dtype == np.int64


def test_zero_cutoff_gives_only_self_images():
    lattice = 3.0 * np.eye(3)
    positions = np.array([[0.0, 0.0, 0.0], [1.5, 1.5, 1.5]])
    table = image_table(lattice, positions, 0.0)
    np.testing.assert_array_equal(table.i, [0, 1])
    np.testing.assert_array_equal(table.j, [0, 1])


def test_cutoff_derived_from_config():
    cfg = CrystalformerConfig()
    assert table_cutoff(cfg) == pytest.approx(4.5 * 1.4 / np.sqrt(0.5))
    assert cfg.cutoff == table_cutoff(cfg)
    cfg6 = CrystalformerConfig(cutoff_sigmas=6.0, r0=1.2, rho_lower_bound=0.4)
    assert table_cutoff(cfg6) == pytest.approx(6.0 * 1.2 / np.sqrt(0.4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="lattice must be"):
        image_table(np.eye(2), np.zeros((1, 3)), 1.0)
    with pytest.raises(ValueError, match="cutoff"):
        image_table(np.eye(3), np.zeros((1, 3)), -1.0)


# --- truncation of sum_n exp(-d^2 / 2 sigma^2) -------------------------------------------------

def gaussian_sums(lattice, offset, sigma, radii):
    """sum over images within each radius of exp(-|offset + nL|^2 / (2 sigma^2))."""
    table = image_table(lattice, np.stack([np.zeros(3), offset]), max(radii))
    sel = (table.i == 0) & (table.j == 1)
    d = table.distances(lattice, np.stack([np.zeros(3), offset]))[sel]
    return [np.exp(-d[d <= r] ** 2 / (2 * sigma**2)).sum() for r in radii]


def test_truncation_converges_monotonically():
    rng = np.random.default_rng(11)
    sigma_max = CrystalformerConfig().sigma_max
    worst = {3.5: 0.0, 4.5: 0.0, 6.0: 0.0}
    for _ in range(40):
        spacing = rng.uniform(1.5, 10.0)
        lattice = random_lattice(rng, scale=spacing, skew=0.25)
        offset = rng.random(3) @ lattice
        sigma = rng.uniform(0.3, sigma_max)
        radii = [c * sigma for c in (3.5, 4.5, 6.0, 8.0, 12.0)]
        sums = gaussian_sums(lattice, offset, sigma, radii)
        assert np.all(np.diff(sums) >= 0)  # enlarging the sphere only adds images
        exact = sums[-1]
        assert exact - sums[-2] < 1e-12  # converged
        for c, s in zip((3.5, 4.5, 6.0), sums[:3]):
            worst[c] = max(worst[c], exact - s)
    assert worst[6.0] < 1e-6
    # The default c = 4.5 must be no worse than the reference's box rule (worst ~3.6e-3).
    assert worst[4.5] < 3.6e-3
    assert worst[3.5] > worst[4.5] > worst[6.0]
