"""One record type for a crystal (:class:`Crystal`), converters and validation.

Every loader (pymatgen, ASE, JARVIS-style dicts) produces a :class:`Crystal`; everything
downstream (image tables, batching, training) consumes only this type. Conventions:

* ``lattice`` is (3, 3) with the lattice vectors as **rows** (pymatgen's ``lattice.matrix``,
  ASE's ``cell.array``); left-handed bases (det < 0) are valid.
* ``positions`` are Cartesian (N, 3) in A and need not be wrapped into the cell.
* Partial occupancy lives in an optional :class:`SiteDisorder`; ``numbers`` always holds one
  atomic number per site (the majority species) so models that ignore disorder still work.

Converters never validate; call :func:`validate` (it returns the crystal, for chaining):

    crystal = validate(from_pymatgen(structure, id="mp-1", labels={"e_form": -1.2}))

pymatgen and ASE are imported lazily inside the functions that need them, so importing this
module costs only numpy.
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from cfdist.geometry import image_table

__all__ = [
    "Crystal",
    "SiteDisorder",
    "InvalidCrystalError",
    "REASONS",
    "MAX_Z",
    "validate",
    "from_pymatgen",
    "from_ase",
    "from_jarvis",
    "from_record",
    "to_pymatgen",
]

# Heaviest element accepted by validate (Cf); embeddings of Crystalformer-style models are sized for it.
MAX_Z = 98
# Slack on the per-site occupancy sum (CIF occupancies are often rounded, e.g. 3 x 0.3333).
_OCC_SUM_TOL = 1e-6
# A merged single-species occupancy this close to 1 counts as fully occupied (0.3 + 0.7 rounding).
_FULL_TOL = 1e-9

REASONS = frozenset({
    "non_finite", "non_finite_label", "small_volume", "overlapping_atoms", "bad_element",
    "bad_occupancy", "empty", "bad_shape", "not_periodic", "unparseable",
})


class InvalidCrystalError(ValueError):
    """A structure cannot be used; the message names the structure id and the concrete problem.

    Attributes:
        crystal_id: id of the offending structure.
        reason: short machine-readable code, one of :data:`REASONS`.
        detail: the human-readable part of the message (without the id prefix).
    """

    def __init__(self, crystal_id: str, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown InvalidCrystalError reason {reason!r}")
        self.crystal_id = str(crystal_id)
        self.reason = reason
        self.detail = detail
        super().__init__(f"crystal {self.crystal_id!r}: {detail}")

    def __reduce__(self):
        # Default exception pickling calls cls(*self.args) = cls(message), which would fail;
        # worker processes (DataLoader, multiprocessing pools) must be able to ship this error.
        return (type(self), (self.crystal_id, self.reason, self.detail))


@dataclass(frozen=True, eq=False)
class SiteDisorder:
    """Partial occupancies of the disordered sites of a crystal.

    Sites not listed are fully occupied by ``Crystal.numbers[site]``. Entries are grouped by
    site (``site`` non-decreasing); a site may carry several species and/or a vacancy
    (occupancy sum < 1).

    Attributes:
        site: (S,) int64 site index of each entry, non-decreasing.
        z: (S,) int64 atomic number of each entry.
        occupancy: (S,) float64 occupancy in (0, 1]; per-site sum <= 1 (+1e-6).
    """

    site: np.ndarray
    z: np.ndarray
    occupancy: np.ndarray

    def __post_init__(self):
        site = _as_1d_int(self.site, "disorder.site")
        z = _as_1d_int(self.z, "disorder.z")
        occupancy = np.asarray(self.occupancy, dtype=np.float64)
        if occupancy.ndim != 1:
            raise ValueError(f"disorder.occupancy must be 1-D, got shape {occupancy.shape}")
        if not (site.shape == z.shape == occupancy.shape):
            raise ValueError("disorder.site, disorder.z and disorder.occupancy must have equal length, got "
                             f"{site.shape[0]}, {z.shape[0]} and {occupancy.shape[0]}")
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "z", z)
        object.__setattr__(self, "occupancy", occupancy)

    def __len__(self) -> int:
        return int(self.site.shape[0])


@dataclass(frozen=True, eq=False)
class Crystal:
    """One crystal structure with optional labels and site disorder.

    Attributes:
        id: structure id (e.g. ``"mp-123"``); every error message names it.
        numbers: (N,) int64 atomic number per site (disordered site: the majority species).
        lattice: (3, 3) float64 lattice vectors as rows (A).
        positions: (N, 3) float64 Cartesian positions (A), not necessarily wrapped.
        labels: target values by name; NaN marks a missing label (``None`` is stored as NaN).
        disorder: partial occupancies, only for disordered structures.

    Construction normalises dtypes and checks shapes (:class:`InvalidCrystalError` with
    reason ``"bad_shape"``, a ``ValueError``); content checks are :func:`validate`'s job.
    Equality is identity (``eq=False``): arrays make field-wise ``==`` ambiguous.
    """

    id: str
    numbers: np.ndarray
    lattice: np.ndarray
    positions: np.ndarray
    labels: dict[str, float] = field(default_factory=dict)
    disorder: SiteDisorder | None = None

    def __post_init__(self):
        cid = str(self.id)
        object.__setattr__(self, "id", cid)
        try:
            numbers = _as_1d_int(self.numbers, "numbers")
        except ValueError as exc:
            raise InvalidCrystalError(cid, "bad_shape", str(exc)) from None
        lattice = np.asarray(self.lattice, dtype=np.float64)
        if lattice.shape != (3, 3):
            raise InvalidCrystalError(cid, "bad_shape", f"lattice must have shape (3, 3), got {lattice.shape}")
        positions = np.asarray(self.positions, dtype=np.float64)
        if positions.size == 0:
            positions = positions.reshape(0, 3)  # [] and np.zeros((0,)) mean "no atoms"
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise InvalidCrystalError(cid, "bad_shape", f"positions must have shape (N, 3), got {positions.shape}")
        if positions.shape[0] != numbers.shape[0]:
            raise InvalidCrystalError(cid, "bad_shape", f"{numbers.shape[0]} atomic numbers but "
                                                        f"{positions.shape[0]} positions")
        disorder = self.disorder
        if disorder is not None and not isinstance(disorder, SiteDisorder):
            raise InvalidCrystalError(cid, "bad_shape", f"disorder must be a SiteDisorder or None, "
                                                        f"got {type(disorder).__name__}")
        object.__setattr__(self, "numbers", numbers)
        object.__setattr__(self, "lattice", lattice)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "labels", _normalise_labels(cid, self.labels))

    def relabelled(self, id: str, labels: Mapping[str, float]) -> "Crystal":
        """A copy with another ``id`` and ``labels``, sharing the (already checked) arrays.

        ``dataclasses.replace`` would re-run the array checks of ``__post_init__``; preprocessing
        relabels every structure, so this skips them (labels are still normalised)."""
        cid = str(id)
        new = copy.copy(self)
        object.__setattr__(new, "id", cid)
        object.__setattr__(new, "labels", _normalise_labels(cid, labels))
        return new

    @property
    def n_atoms(self) -> int:
        """Number of sites N."""
        return int(self.numbers.shape[0])

    @property
    def volume(self) -> float:
        """Cell volume |det L| in A^3 (positive for left-handed lattices too)."""
        (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = self.lattice.tolist()  # 20x cheaper than np.linalg.det
        return abs(a0 * (b1 * c2 - b2 * c1) - a1 * (b0 * c2 - b2 * c0) + a2 * (b0 * c1 - b1 * c0))

    def species(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat (site, z, occupancy) arrays over every (site, species) pair.

        Returns:
            site: (S,) int64, non-decreasing; z: (S,) int64; occupancy: (S,) float64.
            For an ordered crystal: ``(arange(N), numbers, ones(N))``. Sites listed in
            ``disorder`` contribute their entries (in their stored order) instead.
        """
        n = self.n_atoms
        ordered_site = np.arange(n, dtype=np.int64)
        if self.disorder is None or len(self.disorder) == 0:
            return ordered_site, self.numbers.copy(), np.ones(n, dtype=np.float64)
        d = self.disorder
        keep = np.ones(n, dtype=bool)
        listed = d.site[(d.site >= 0) & (d.site < n)]
        keep[listed] = False
        site = np.concatenate([ordered_site[keep], d.site])
        z = np.concatenate([self.numbers[keep], d.z])
        occ = np.concatenate([np.ones(int(keep.sum())), d.occupancy])
        order = np.argsort(site, kind="stable")  # stable: keeps each site's stored species order
        return site[order], z[order], occ[order]


# ----------------------------------------------------------------------------- validation


def validate(crystal: Crystal, *, min_distance: float = 0.5, min_volume: float = 0.1,
             check_overlap: bool = True) -> Crystal:
    """Check that ``crystal`` is physically usable; return it unchanged (for chaining).

    Checks, in order (the first failure raises :class:`InvalidCrystalError`):

    1. ``bad_shape`` / ``empty``: array shapes (re-checked: frozen fields can be bypassed), N >= 1.
    2. ``non_finite``: lattice, positions, occupancies finite; ``non_finite_label``: labels not
       +-inf (NaN means missing and is allowed here).
    3. ``bad_element``: every Z (and every disordered species) in 1..98.
    4. ``bad_occupancy``: disorder entries well-formed (site in range and grouped, occupancy in
       (0, 1], per-site sum <= 1 + 1e-6, no repeated species, ``numbers`` = majority species).
    5. ``small_volume``: |det L| >= ``min_volume`` (before 6, so image tables never see a
       singular lattice).
    6. ``overlapping_atoms``: no two atoms, including periodic images of the same atom, within
       ``min_distance`` A (distance <= min_distance counts). Reports the closest pair.

    Args:
        crystal: the structure to check.
        min_distance: smallest allowed interatomic distance (A).
        min_volume: smallest allowed cell volume (A^3).
        check_overlap: run check 6; pass False when the caller builds an image table anyway
            and calls :func:`check_overlaps` with it (saves a second table).
    """
    if not isinstance(crystal, Crystal):
        raise TypeError(f"validate expects a Crystal, got {type(crystal).__name__}")
    if not (math.isfinite(min_distance) and min_distance >= 0):
        raise ValueError(f"min_distance must be finite and >= 0, got {min_distance}")
    if not (math.isfinite(min_volume) and min_volume >= 0):
        raise ValueError(f"min_volume must be finite and >= 0, got {min_volume}")
    cid = crystal.id
    numbers, lattice, positions = crystal.numbers, crystal.lattice, crystal.positions

    # 1. shape / empty
    if numbers.ndim != 1 or lattice.shape != (3, 3) or positions.shape != (numbers.shape[0], 3):
        raise InvalidCrystalError(cid, "bad_shape", f"inconsistent shapes: numbers {numbers.shape}, "
                                                    f"lattice {lattice.shape}, positions {positions.shape}")
    n = crystal.n_atoms
    if n == 0:
        raise InvalidCrystalError(cid, "empty", "structure has no atoms")

    # 2. non-finite
    if not np.isfinite(lattice).all():
        bad = tuple(int(k) for k in np.argwhere(~np.isfinite(lattice))[0])
        raise InvalidCrystalError(cid, "non_finite", f"non-finite lattice entry {lattice[bad]} at row {bad[0]}, "
                                                     f"column {bad[1]}")
    if not np.isfinite(positions).all():
        site = int(np.argwhere(~np.isfinite(positions))[0, 0])
        raise InvalidCrystalError(cid, "non_finite", f"non-finite position {positions[site].tolist()} "
                                                     f"of site {site}")
    disorder = crystal.disorder
    if disorder is not None and not np.isfinite(disorder.occupancy).all():
        k = int(np.argmax(~np.isfinite(disorder.occupancy)))
        raise InvalidCrystalError(cid, "non_finite", f"non-finite occupancy {disorder.occupancy[k]} on "
                                                     f"site {int(disorder.site[k])}")
    for name, value in crystal.labels.items():
        if math.isinf(value):
            raise InvalidCrystalError(cid, "non_finite_label", f"label {name!r} is {value}")

    # 3. elements
    bad = np.nonzero((numbers < 1) | (numbers > MAX_Z))[0]
    if bad.size:
        raise InvalidCrystalError(cid, "bad_element", f"atomic number Z={int(numbers[bad[0]])} at site "
                                                      f"{int(bad[0])} is outside 1..{MAX_Z}")
    if disorder is not None:
        bad = np.nonzero((disorder.z < 1) | (disorder.z > MAX_Z))[0]
        if bad.size:
            raise InvalidCrystalError(cid, "bad_element", f"atomic number Z={int(disorder.z[bad[0]])} on "
                                                          f"disordered site {int(disorder.site[bad[0]])} is "
                                                          f"outside 1..{MAX_Z}")

    # 4. occupancies
    if disorder is not None and len(disorder):
        _check_disorder(cid, numbers, disorder)

    # 5. volume
    volume = crystal.volume
    if not volume >= min_volume:
        raise InvalidCrystalError(cid, "small_volume", f"cell volume {volume:.4g} A^3 is below "
                                                       f"{min_volume:g} A^3")

    if check_overlap:
        check_overlaps(crystal, min_distance)
    return crystal


def check_overlaps(crystal: Crystal, min_distance: float = 0.5, table=None) -> None:
    """Raise ``overlapping_atoms`` if two atoms (or an atom and its own image) are within ``min_distance``.

    Args:
        crystal: a crystal that passed checks 1-5 of :func:`validate`.
        min_distance: smallest allowed distance (A); a distance equal to it counts as overlap.
        table: optional image table of ``crystal`` with cutoff >= ``min_distance`` (e.g. the
            model's); its entries within ``min_distance`` are used instead of building one.
    """
    lattice, positions = crystal.lattice, crystal.positions
    if table is None or table.cutoff < min_distance:
        table = image_table(lattice, positions, min_distance)
    else:
        limit = min_distance * min_distance
        if table.d2 is not None:  # enumeration distances: only candidates near the limit are recomputed
            candidates = np.nonzero(table.d2 <= limit + 1e-9)[0]
            if len(candidates) == crystal.n_atoms:  # only the self images (their d2 is exactly 0)
                return
        else:
            candidates = np.arange(len(table))
        i, j, n = table.i[candidates], table.j[candidates], table.n[candidates]
        vec = positions[j] + n @ lattice - positions[i]
        near = np.einsum("tx,tx->t", vec, vec) <= limit
        table = type(table)(i[near], j[near], n[near], float(min_distance))
    # image_table lists every image within min_distance; the self entries (i, i, 0) are always
    # there, anything else is an overlap (incl. an atom and its own image).
    # Each pair is listed as (i, j, n) and (j, i, -n); keep i < j, or i == j with n
    # lexicographically positive, so the reported pair does not hinge on rounding.
    n0, n1, n2 = table.n[:, 0], table.n[:, 1], table.n[:, 2]
    positive = (n0 > 0) | ((n0 == 0) & ((n1 > 0) | ((n1 == 0) & (n2 > 0))))
    other = (table.i < table.j) | ((table.i == table.j) & positive)
    if other.any():
        i, j, shift = table.i[other], table.j[other], table.n[other]
        dist = np.linalg.norm(positions[j] + shift @ lattice - positions[i], axis=1)
        k = int(np.argmin(dist))  # first minimum in (i, j, n) order
        a, b, s = int(i[k]), int(j[k]), tuple(int(x) for x in shift[k])
        where = f"sites {a} and {b}" + (f", periodic image {s}" if any(s) else "")
        raise InvalidCrystalError(crystal.id, "overlapping_atoms", f"two atoms closer than {min_distance:g} A "
                                                            f"({where}, distance {dist[k]:.3f} A)")


def _check_disorder(cid: str, numbers: np.ndarray, d: SiteDisorder) -> None:
    """Raise ``bad_occupancy`` unless ``d`` is a well-formed, consistent disorder table."""
    n = numbers.shape[0]
    out = np.nonzero((d.site < 0) | (d.site >= n))[0]
    if out.size:
        raise InvalidCrystalError(cid, "bad_occupancy", f"disorder entry {int(out[0])} refers to site "
                                                        f"{int(d.site[out[0]])}, but there are {n} sites")
    down = np.nonzero(np.diff(d.site) < 0)[0]
    if down.size:
        k = int(down[0])
        raise InvalidCrystalError(cid, "bad_occupancy", f"disorder sites must be non-decreasing, got site "
                                                        f"{int(d.site[k])} before {int(d.site[k + 1])}")
    bad = np.nonzero((d.occupancy <= 0) | (d.occupancy > 1))[0]
    if bad.size:
        k = int(bad[0])
        raise InvalidCrystalError(cid, "bad_occupancy", f"occupancy {d.occupancy[k]:.6g} of Z={int(d.z[k])} on "
                                                        f"site {int(d.site[k])} is outside (0, 1]")
    sites, start = np.unique(d.site, return_index=True)
    totals = np.add.reduceat(d.occupancy, start)
    over = np.nonzero(totals > 1 + _OCC_SUM_TOL)[0]
    if over.size:
        k = int(over[0])
        raise InvalidCrystalError(cid, "bad_occupancy", f"occupancies on site {int(sites[k])} sum to "
                                                        f"{totals[k]:.6g} > 1")
    stop = np.append(start[1:], len(d))
    for s, lo, hi in zip(sites.tolist(), start.tolist(), stop.tolist()):
        z, occ = d.z[lo:hi], d.occupancy[lo:hi]
        if np.unique(z).size != z.size:
            raise InvalidCrystalError(cid, "bad_occupancy", f"site {s} lists a species twice "
                                                            f"(Z={z.tolist()})")
        # ``numbers`` must be a majority species, else models ignoring disorder see the wrong atom.
        majority = z[occ >= occ.max() - _FULL_TOL]
        if int(numbers[s]) not in majority.tolist():
            raise InvalidCrystalError(cid, "bad_occupancy", f"site {s} has numbers Z={int(numbers[s])} but its "
                                                            f"majority species is Z={int(majority[0])}")


# ----------------------------------------------------------------------------- converters


def from_pymatgen(structure, id: str | None = None, labels: Mapping[str, float] | None = None) -> Crystal:
    """Crystal from a pymatgen ``Structure`` or ``IStructure`` (not validated).

    Disordered sites (several species, or one species with occupancy < 1) go to a
    :class:`SiteDisorder` listing all their species; ``numbers`` gets the majority species
    (first listed on ties). Species are reduced to elements: oxidation states are dropped and
    same-element species on one site (Fe2+/Fe3+) are merged; dummy species become Z = 0
    (rejected by :func:`validate`).

    Args:
        structure: pymatgen (I)Structure; its lattice must be periodic along all three axes.
        id: structure id; default ``structure.properties["id"]``, else ``"structure"``.
        labels: target values; default ``structure.properties["labels"]`` (written by
            :func:`to_pymatgen`), else empty.
    """
    from pymatgen.core import DummySpecies, IStructure

    properties = getattr(structure, "properties", None) or {}
    cid = str(id if id is not None else properties.get("id") or "structure")
    if not isinstance(structure, IStructure):
        raise InvalidCrystalError(cid, "unparseable", f"expected a pymatgen Structure, got {type(structure).__name__}")
    if labels is None and isinstance(properties.get("labels"), Mapping):
        labels = properties["labels"]
    pbc = tuple(bool(p) for p in getattr(structure.lattice, "pbc", (True, True, True)))
    if not all(pbc):
        raise InvalidCrystalError(cid, "not_periodic", f"structure is not periodic along all axes (pbc={pbc})")

    numbers = np.zeros(len(structure), dtype=np.int64)
    d_site, d_z, d_occ = [], [], []
    for k, site in enumerate(structure):
        merged: dict[int, float] = {}  # Z -> occupancy, first-seen order
        for sp, occ in site.species.items():
            z = 0 if isinstance(sp, DummySpecies) else int(sp.Z)
            merged[z] = merged.get(z, 0.0) + float(occ)
        if not merged:
            continue  # empty composition: Z = 0, rejected by validate
        zs, occs = list(merged), list(merged.values())
        numbers[k] = zs[int(np.argmax(occs))]
        if len(zs) == 1 and abs(occs[0] - 1.0) <= _FULL_TOL:
            continue  # fully occupied by one element: ordered
        d_site += [k] * len(zs)
        d_z += zs
        d_occ += occs
    disorder = SiteDisorder(np.array(d_site, np.int64), np.array(d_z, np.int64), np.array(d_occ)) if d_site else None
    return Crystal(cid, numbers, np.array(structure.lattice.matrix, dtype=np.float64),
                   np.array(structure.cart_coords, dtype=np.float64).reshape(-1, 3),
                   dict(labels or {}), disorder)


def to_pymatgen(crystal: Crystal):
    """pymatgen ``Structure`` of ``crystal`` (Cartesian coordinates, nothing wrapped).

    Disordered sites become dict species ``{Element: occupancy}``. ``id`` and ``labels`` are
    stored in ``structure.properties`` so that :func:`from_pymatgen` round-trips losslessly
    (positions up to the ~1e-15 A rounding of pymatgen's fractional storage).
    """
    from pymatgen.core import Element, Structure

    species: list[Any] = [Element.from_Z(int(z)) for z in crystal.numbers]
    if crystal.disorder is not None:
        d = crystal.disorder
        by_site: dict[int, dict] = {}
        for s, z, occ in zip(d.site.tolist(), d.z.tolist(), d.occupancy.tolist()):
            by_site.setdefault(s, {})[Element.from_Z(z)] = occ
        for s, comp in by_site.items():
            species[s] = comp
    return Structure(crystal.lattice, species, crystal.positions, coords_are_cartesian=True,
                     properties={"id": crystal.id, "labels": dict(crystal.labels)})


def from_ase(atoms, id: str | None = None, labels: Mapping[str, float] | None = None) -> Crystal:
    """Crystal from an ``ase.Atoms`` (not validated). ASE has no partial occupancy: ordered only.

    Args:
        atoms: periodic along all three axes (``atoms.pbc.all()``), else ``not_periodic``.
        id: structure id; default ``atoms.info["id"]``, else ``"atoms"``.
        labels: target values (default empty).
    """
    info = getattr(atoms, "info", None) or {}
    cid = str(id if id is not None else info.get("id") or "atoms")
    if not all(hasattr(atoms, a) for a in ("pbc", "cell", "positions", "numbers")):
        raise InvalidCrystalError(cid, "unparseable", f"expected an ase.Atoms, got {type(atoms).__name__}")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.all():
        raise InvalidCrystalError(cid, "not_periodic", f"atoms are not periodic along all axes "
                                                       f"(pbc={tuple(pbc.tolist())})")
    # Copies: atoms.positions is the live array; a later edit of atoms must not change the crystal.
    return Crystal(cid, np.array(atoms.numbers, dtype=np.int64), np.array(atoms.cell.array, dtype=np.float64),
                   np.array(atoms.positions, dtype=np.float64), dict(labels or {}))


def from_jarvis(atoms_dict: Mapping, id: str | None = None, labels: Mapping[str, float] | None = None) -> Crystal:
    """Crystal from a JARVIS-tools ``Atoms.to_dict()`` style mapping (not validated).

    Expected keys: ``lattice_mat`` (3x3, rows = lattice vectors, A), ``coords`` (Nx3),
    ``elements`` (N element symbols), ``cartesian`` (bool; fractional coords when false).
    Other keys are ignored. Missing keys or bad shapes raise ``unparseable``; an unknown
    element symbol raises ``bad_element``.

    Args:
        atoms_dict: the mapping (e.g. the ``"atoms"`` field of a MEGNet/JARVIS record).
        id: structure id; default ``atoms_dict["id"]`` if present, else ``"jarvis"``.
        labels: target values (default empty).
    """
    cid = str(id if id is not None else (atoms_dict.get("id") if isinstance(atoms_dict, Mapping) else None)
              or "jarvis")
    if not isinstance(atoms_dict, Mapping):
        raise InvalidCrystalError(cid, "unparseable", f"expected a JARVIS atoms dict, got {type(atoms_dict).__name__}")
    missing = [k for k in ("lattice_mat", "coords", "elements", "cartesian") if k not in atoms_dict]
    if missing:
        raise InvalidCrystalError(cid, "unparseable", f"JARVIS atoms dict lacks key(s) {missing}")
    cartesian = atoms_dict["cartesian"]
    if not isinstance(cartesian, (bool, np.bool_)):
        # Guessing here would silently produce a wrong structure.
        raise InvalidCrystalError(cid, "unparseable", f"'cartesian' must be a bool, got {cartesian!r}")
    elements = atoms_dict["elements"]
    if isinstance(elements, str) or not all(isinstance(e, str) for e in elements):
        raise InvalidCrystalError(cid, "unparseable", "'elements' must be a list of element symbols")
    try:
        lattice = np.array(atoms_dict["lattice_mat"], dtype=np.float64)
        coords = np.array(atoms_dict["coords"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidCrystalError(cid, "unparseable", f"non-numeric lattice_mat or coords ({exc})") from None
    if coords.size == 0:
        coords = coords.reshape(0, 3)
    if lattice.shape != (3, 3):
        raise InvalidCrystalError(cid, "unparseable", f"lattice_mat must be 3x3, got shape {lattice.shape}")
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] != len(elements):
        raise InvalidCrystalError(cid, "unparseable", f"coords must be Nx3 with N = {len(elements)} elements, "
                                                      f"got shape {coords.shape}")
    table = _symbol_to_z()
    numbers = np.zeros(len(elements), dtype=np.int64)
    for k, symbol in enumerate(elements):
        z = table.get(symbol.strip())
        if z is None:
            raise InvalidCrystalError(cid, "bad_element", f"unknown element symbol {symbol!r} at site {k}")
        numbers[k] = z
    positions = coords if cartesian else coords @ lattice  # rows = lattice vectors: cart = frac @ L
    return Crystal(cid, numbers, lattice, positions, dict(labels or {}))


def from_record(obj, id: str | None = None, labels: Mapping[str, float] | None = None) -> Crystal:
    """Crystal from any supported record, dispatching on its type (not validated).

    * :class:`Crystal`: returned as is, or a copy with the given ``id`` / ``labels`` replaced.
    * pymatgen ``Structure`` / ``IStructure``: :func:`from_pymatgen`.
    * ``ase.Atoms``: :func:`from_ase`.
    * mapping with ``"lattice_mat"``: :func:`from_jarvis`.

    Anything else raises ``unparseable``.
    """
    if isinstance(obj, Crystal):
        if id is None and labels is None:
            return obj
        return Crystal(obj.id if id is None else id, obj.numbers, obj.lattice, obj.positions,
                       obj.labels if labels is None else dict(labels), obj.disorder)
    # A pymatgen/ASE object can only exist if its package is already imported: checking
    # sys.modules keeps plain dict records from paying for those imports.
    if "pymatgen.core.structure" in sys.modules:
        from pymatgen.core import IStructure
        if isinstance(obj, IStructure):
            return from_pymatgen(obj, id=id, labels=labels)
    if "ase.atoms" in sys.modules:
        from ase import Atoms
        if isinstance(obj, Atoms):
            return from_ase(obj, id=id, labels=labels)
    if isinstance(obj, Mapping) and "lattice_mat" in obj:
        return from_jarvis(obj, id=id, labels=labels)
    raise InvalidCrystalError(str(id) if id is not None else "record", "unparseable",
                              f"cannot build a crystal from a {type(obj).__module__}.{type(obj).__name__}")


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _symbol_to_z() -> dict[str, int]:
    """Element symbol -> Z for Z = 1..118 (ase's table; its dummy 'X' = 0 is left out)."""
    from ase.data import chemical_symbols

    return {symbol: z for z, symbol in enumerate(chemical_symbols) if z >= 1}


def _as_1d_int(values, name: str) -> np.ndarray:
    """(N,) int64 from ``values``; floats must be integral (no silent truncation of 26.7)."""
    arr = np.asarray(values)
    if arr.size == 0:
        arr = arr.reshape(0)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):  # also catches NaN
            raise ValueError(f"{name} must be integers, got {arr.tolist()}")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.int64)


def _normalise_labels(cid: str, labels) -> dict[str, float]:
    """Copy ``labels`` to a plain ``dict[str, float]``; ``None`` values become NaN (missing)."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise InvalidCrystalError(cid, "bad_shape", f"labels must be a mapping, got {type(labels).__name__}")
    out = {}
    for name, value in labels.items():
        try:
            out[str(name)] = math.nan if value is None else float(value)
        except (TypeError, ValueError):
            raise InvalidCrystalError(cid, "unparseable", f"label {name!r} is not a number: {value!r}") from None
    return out
