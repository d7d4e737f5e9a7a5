"""Reusable invariance helpers (in the spirit of e3nn's ``assert_equivariant``).

Each transform takes a :class:`~cfdist.crystal.Crystal` and returns the same physical
crystal described differently (another cell, basis, wrapping, frame or atom order).
:func:`assert_invariant` checks that a model's predictions do not change under them.
Use them for your own models too::

    from cfdist.testing import assert_invariant, supercell
    assert_invariant(model.double().predict, crystal, {"2x2x2": lambda c: supercell(c, 2 * np.eye(3))})
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cfdist.crystal import Crystal, SiteDisorder

Transform = Callable[[Crystal], Crystal]


def _replace(crystal: Crystal, **changes) -> Crystal:
    return dataclasses.replace(crystal, **changes)


def supercell(crystal: Crystal, matrix) -> Crystal:
    """Supercell with lattice M L for an integer matrix M with det M != 0.

    Every atom is repeated at the |det M| lattice translations t L that fall inside
    the new cell, so the result describes the identical infinite crystal.
    """
    m = np.asarray(matrix, dtype=np.int64).reshape(3, 3)
    det = int(round(np.linalg.det(m)))
    if det == 0:
        raise ValueError("supercell matrix must be non-singular")
    # Integer points t with t M^-1 in [0, 1)^3: search the box spanned by M's corners.
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) @ m
    lo, hi = corners.min(0), corners.max(0)
    grid = np.stack(np.meshgrid(*[np.arange(lo[k], hi[k] + 1) for k in range(3)], indexing="ij"), -1).reshape(-1, 3)
    frac = grid @ np.linalg.inv(m)
    inside = np.all((frac >= -1e-9) & (frac < 1 - 1e-9), axis=1)
    shifts = grid[inside]
    if len(shifts) != abs(det):
        raise AssertionError(f"found {len(shifts)} translations for det {det}")
    n = crystal.n_atoms
    positions = (crystal.positions[None, :, :] + (shifts @ crystal.lattice)[:, None, :]).reshape(-1, 3)
    disorder = None
    if crystal.disorder is not None:
        d = crystal.disorder
        copies = np.arange(len(shifts))[:, None] * n
        disorder = SiteDisorder(site=(d.site[None, :] + copies).reshape(-1), z=np.tile(d.z, len(shifts)),
                                occupancy=np.tile(d.occupancy, len(shifts)))
    return _replace(crystal, lattice=m @ crystal.lattice, positions=positions,
                    numbers=np.tile(crystal.numbers, len(shifts)), disorder=disorder)


def change_basis(crystal: Crystal, unimodular) -> Crystal:
    """Same lattice, another basis: L' = U L with integer U, |det U| = 1."""
    u = np.asarray(unimodular, dtype=np.int64).reshape(3, 3)
    if abs(round(np.linalg.det(u))) != 1:
        raise ValueError("change_basis needs a unimodular integer matrix")
    return _replace(crystal, lattice=u @ crystal.lattice)


def shift_by_lattice(crystal: Crystal, shifts) -> Crystal:
    """Move atom i by the lattice vector m_i L (m_i integer): the same crystal, unwrapped."""
    m = np.asarray(shifts, dtype=np.int64).reshape(crystal.n_atoms, 3)
    return _replace(crystal, positions=crystal.positions + m @ crystal.lattice)


def rigid_motion(crystal: Crystal, rotation, translation=(0.0, 0.0, 0.0)) -> Crystal:
    """Rotate (or rotate-reflect) positions and lattice vectors by R and translate by t."""
    r = np.asarray(rotation, dtype=np.float64)
    return _replace(crystal, lattice=crystal.lattice @ r.T,
                    positions=crystal.positions @ r.T + np.asarray(translation, dtype=np.float64))


def permute_atoms(crystal: Crystal, permutation) -> Crystal:
    """Reorder atoms: new atom k is old atom permutation[k]."""
    perm = np.asarray(permutation, dtype=np.int64)
    disorder = None
    if crystal.disorder is not None:
        d = crystal.disorder
        inverse = np.argsort(perm)
        new_site = inverse[d.site]
        order = np.argsort(new_site, kind="stable")
        disorder = SiteDisorder(site=new_site[order], z=d.z[order], occupancy=d.occupancy[order])
    return _replace(crystal, numbers=crystal.numbers[perm], positions=crystal.positions[perm], disorder=disorder)


def random_rotation(rng: np.random.Generator, improper: bool = False) -> np.ndarray:
    """Uniform random rotation matrix (3, 3); with ``improper`` a rotation times a reflection."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return -q if improper else q


def random_unimodular(rng: np.random.Generator, steps: int = 4) -> np.ndarray:
    """Random integer matrix with det +-1 (products of elementary shears and a swap)."""
    u = np.eye(3, dtype=np.int64)
    for _ in range(steps):
        a, b = rng.choice(3, size=2, replace=False)
        e = np.eye(3, dtype=np.int64)
        e[a, b] = rng.choice([-1, 1])
        u = e @ u
    if rng.random() < 0.5:
        u = u[[1, 0, 2]]
    return u


def random_crystal(rng: np.random.Generator, n_atoms: int, *, min_distance: float = 1.0,
                   volume_per_atom: float = 15.0, skew: float = 0.3, id: str = "random") -> Crystal:
    """A random triclinic crystal with atoms at least ``min_distance`` apart (periodically)."""
    from cfdist.crystal import InvalidCrystalError, validate

    for _ in range(1000):
        lattice = np.eye(3) + skew * rng.normal(size=(3, 3))
        vol = abs(np.linalg.det(lattice))
        if vol < 0.3:
            continue
        lattice *= (volume_per_atom * n_atoms / vol) ** (1 / 3)
        positions = rng.random((n_atoms, 3)) @ lattice
        numbers = rng.integers(1, 90, size=n_atoms)
        crystal = Crystal(id=id, numbers=numbers, lattice=lattice, positions=positions)
        try:
            return validate(crystal, min_distance=min_distance)
        except InvalidCrystalError:
            continue
    raise RuntimeError("could not place atoms; lower min_distance")


def assert_invariant(predict: Callable[[Sequence[Crystal]], torch.Tensor], crystal: Crystal,
                     transforms: Mapping[str, Transform], rtol: float = 1e-6, atol: float = 1e-12) -> None:
    """Assert ``predict([t(crystal)]) == predict([crystal])`` for every named transform.

    ``predict`` maps a list of crystals to an (n, targets) tensor (e.g. ``model.predict``).
    Raises AssertionError naming the transform and the relative error.
    """
    expected = predict([crystal]).detach().double()
    scale = expected.abs().max().item()
    for name, transform in transforms.items():
        got = predict([transform(crystal)]).detach().double()
        err = (got - expected).abs().max().item()
        if not err <= atol + rtol * scale:
            raise AssertionError(f"{crystal.id}: prediction changed under {name!r}: max abs diff {err:.3e} "
                                 f"(relative {err / max(scale, 1e-300):.3e}, rtol {rtol})")


def standard_transforms(crystal: Crystal, rng: np.random.Generator) -> dict[str, Transform]:
    """The invariances a periodic model must have, with random parameters drawn from ``rng``."""
    n = crystal.n_atoms
    wrap = rng.integers(-2, 3, size=(n, 3))
    perm = rng.permutation(n)
    unimodular = random_unimodular(rng)
    rotation, reflection = random_rotation(rng), random_rotation(rng, improper=True)
    translation = rng.normal(size=3) * 5
    return {
        "supercell 2x1x1": lambda c: supercell(c, np.diag([2, 1, 1])),
        "supercell 2x2x2": lambda c: supercell(c, 2 * np.eye(3)),
        "supercell non-diagonal": lambda c: supercell(c, [[1, 1, 0], [-1, 1, 0], [0, 1, 2]]),
        "unimodular basis change": lambda c: change_basis(c, unimodular),
        "wrapping by lattice vectors": lambda c: shift_by_lattice(c, wrap),
        "rotation + translation": lambda c: rigid_motion(c, rotation, translation),
        "reflection + translation": lambda c: rigid_motion(c, reflection, translation),
        "atom permutation": lambda c: permute_atoms(c, perm),
    }
