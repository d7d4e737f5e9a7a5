"""Reusable invariance helpers (in the spirit of e3nn's ``assert_equivariant``).

Each transform takes a :class:`~cfdist.crystal.Crystal` and returns the same physical
crystal described differently (another cell, basis, wrapping, frame or atom order).
:func:`assert_invariant` checks that a model's predictions do not change under them.
Use them for your own models too::

    from cfdist.testing import assert_invariant, supercell
    assert_invariant(model.double().predict, crystal, {"2x2x2": lambda c: supercell(c, 2 * np.eye(3))})
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from cfdist.config import CrystalformerConfig
from cfdist.crystal import Crystal, InvalidCrystalError, SiteDisorder, validate
from cfdist.model import Crystalformer

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
    """The invariances a periodic model must have, with random parameters drawn from ``rng``
    (the transforms of :func:`standard_equivariances`)."""
    return {name: e.transform for name, e in standard_equivariances(crystal, rng).items()}


# ----------------------------------------------------------------------------- energy models


@dataclasses.dataclass(frozen=True)
class Equivariance:
    """A transform together with how an energy model's outputs must follow it.

    Attributes:
        transform: the crystal transform (as in :func:`standard_transforms`).
        atom_map: (N',) new atom k is a copy of old atom ``atom_map[k]``.
        rotation: (3, 3) Cartesian rotation (or rotation-reflection) R applied to the crystal:
            forces become F[atom_map] R^T and the stress R sigma R^T.
        multiplicity: the new cell holds ``multiplicity`` copies of the old one (energy scales with it).
    """

    transform: Transform
    atom_map: np.ndarray
    rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))
    multiplicity: int = 1


def standard_equivariances(crystal: Crystal, rng: np.random.Generator) -> dict[str, Equivariance]:
    """The transforms of :func:`standard_transforms` with their atom maps, rotations and multiplicities."""
    n = crystal.n_atoms
    wrap = rng.integers(-2, 3, size=(n, 3))
    perm = rng.permutation(n)
    unimodular = random_unimodular(rng)
    rotation, reflection = random_rotation(rng), random_rotation(rng, improper=True)
    translation = rng.normal(size=3) * 5
    same = np.arange(n)
    return {
        "supercell 2x1x1": Equivariance(lambda c: supercell(c, np.diag([2, 1, 1])), np.tile(same, 2), multiplicity=2),
        "supercell 2x2x2": Equivariance(lambda c: supercell(c, 2 * np.eye(3)), np.tile(same, 8), multiplicity=8),
        "supercell non-diagonal": Equivariance(lambda c: supercell(c, [[1, 1, 0], [-1, 1, 0], [0, 1, 2]]),
                                               np.tile(same, 4), multiplicity=4),
        "unimodular basis change": Equivariance(lambda c: change_basis(c, unimodular), same),
        "wrapping by lattice vectors": Equivariance(lambda c: shift_by_lattice(c, wrap), same),
        "rotation + translation": Equivariance(lambda c: rigid_motion(c, rotation, translation), same, rotation),
        "reflection + translation": Equivariance(lambda c: rigid_motion(c, reflection, translation), same, reflection),
        "atom permutation": Equivariance(lambda c: permute_atoms(c, perm), perm),
    }


def assert_equivariant(predict: Callable[[Sequence[Crystal]], Mapping[str, object]], crystal: Crystal,
                       equivariances: Mapping[str, Equivariance], rtol: float = 1e-6, atol: float = 1e-12) -> None:
    """Assert that an energy model's outputs follow every named :class:`Equivariance`.

    ``predict`` maps a list of crystals to a mapping with ``"energy"`` ((n,) tensor) and optionally
    ``"forces"`` (list of (N_i, 3)) and ``"stress"`` ((n, 3, 3)), e.g.
    ``lambda cs: model.predict(cs, forces=True, stress=True)``. Checks: the energy is invariant up to
    the multiplicity of a supercell, forces are permuted / tiled and rotated with the atoms, the
    stress (intensive) is rotated. Tolerances are relative to the largest value of each output.
    """

    def outputs(c):
        out = predict([c])
        energy = float(torch.as_tensor(out["energy"]).double().reshape(-1)[0])
        forces = None if out.get("forces") is None else torch.as_tensor(out["forces"][0]).detach().double().numpy()
        stress = None if out.get("stress") is None else torch.as_tensor(out["stress"][0]).detach().double().numpy()
        return energy, forces, stress

    def check(name, what, got, expected):
        err = float(np.abs(np.asarray(got) - np.asarray(expected)).max(initial=0.0))
        scale = float(np.abs(np.asarray(expected)).max(initial=0.0))
        if not err <= atol + rtol * scale:
            raise AssertionError(f"{crystal.id}: {what} changed under {name!r}: max abs diff {err:.3e} "
                                 f"(relative {err / max(scale, 1e-300):.3e}, rtol {rtol})")

    energy, forces, stress = outputs(crystal)
    for name, eq in equivariances.items():
        new_energy, new_forces, new_stress = outputs(eq.transform(crystal))
        r = np.asarray(eq.rotation, dtype=np.float64)
        check(name, "energy", new_energy, eq.multiplicity * energy)
        if forces is not None:
            check(name, "forces", new_forces, forces[np.asarray(eq.atom_map)] @ r.T)
        if stress is not None:
            check(name, "stress", new_stress, r @ stress @ r.T)


@contextlib.contextmanager
def single_threaded():
    """Run a block with torch and OpenBLAS on one thread each.

    Tiny models on a small or shared machine lose far more to idle thread pools competing for
    cores (torch's OpenMP pool and the OpenBLAS pools of numpy / scipy, which ASE's cell filters
    call for 3x3 matrix functions) than they gain; a relaxation can run 10x slower. Linux only for
    OpenBLAS (libraries found in /proc/self/maps); elsewhere only torch's threads are set.
    """
    import ctypes

    torch_threads = torch.get_num_threads()
    restore = []
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    restore.append((setter, int(getter())))
                    setter(1)
                    break
            else:
                continue
            break
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        for setter, threads in restore:
            setter(threads)


def morse_like_energy_model(depth: float = 1.0, stiffness: float = 1.5, bond: float = 2.6, cap: float = 5.0,
                            dtype: torch.dtype = torch.float64, **config):
    """An energy model with hand-set weights whose energy is a known smooth many-body potential.

    For relaxation and MD tests that need minima without training. One block, one head, all
    weights zero except: the edge projection copies the K = 16 Gaussian basis functions into the
    atom state, the output projection is the identity, and the energy head reads them out. With
    q = k = v = 0 every image t of atom i (self image included) gets the attention weight
    c_t = g_t / sum_t' g_t', g_t = exp(-d_t^2 / (2 r0^2)) f(d_t) (f: the cutoff envelope), and

        E = sum_i [ E_ref(Z_i) + sum_k w_k silu(eps m_ik) ],   m_ik = sum_t c_t b_k(d_t),

    with w_k = 2 phi(mu_k) / (eps sqrt(2 pi)), eps = 0.01: close to sum_t c_t phi~(d_t), an
    attention-weighted mean over the images of a Gaussian-smoothed Morse function
    phi(d) = min(depth ((1 - e^{-s(d - bond)})^2 - 1), cap) (eV; s = ``stiffness`` 1/A). Crystals
    relax to nearest-neighbour distances near ``bond``; compressed cells have positive pressure.
    Element references E_ref(Z) = -1 - 3 (Z - 1) / 97 eV (any crystal, all species alike).
    ``config`` overrides :class:`cfdist.CrystalformerConfig` fields (e.g. ``cutoff_sigmas``).
    """
    import math

    k = 16
    settings = {"energy": True, "n_blocks": 1, "d_model": k, "n_heads": 1, "d_ff": k, "n_basis": k, "head_hidden": k,
                "gbf_r_max": 8.0, "target_names": [], **config}
    model = Crystalformer(CrystalformerConfig(**settings)).to(dtype).eval()
    cfg = model.config
    if (cfg.n_blocks, cfg.d_model, cfg.n_heads, cfg.n_basis, cfg.head_hidden) != (1, k, 1, k, k):
        raise ValueError("morse_like_energy_model needs n_blocks=1, d_model=n_basis=head_hidden=16, n_heads=1")
    centres = np.arange(1, k + 1) * cfg.gbf_r_max / k
    x = np.exp(-stiffness * (centres - bond))
    phi = np.minimum(depth * (x * x - 2.0 * x), cap) / math.sqrt(2.0 * math.pi)
    eps = 1e-2
    attention = model.blocks[0].attention
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        attention.edge_proj[0, torch.arange(k), torch.arange(k)] = 1.0
        attention.out_proj.weight.copy_(torch.eye(k))
        model.energy_head[0].weight.copy_(eps * torch.eye(k))
        model.energy_head[2].weight[0].copy_(torch.from_numpy(2.0 * phi / eps))
        attention.sigma_mean.fill_(0.0)
        attention.sigma_std.fill_(1.0)
        model.energy_scale.fill_(1.0)
        model.element_energy.copy_(-1.0 - 3.0 * torch.arange(cfg.n_elements, dtype=torch.float64) / 97.0)
    return model
