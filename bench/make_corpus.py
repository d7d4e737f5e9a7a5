"""Synthetic corpus generator: N labelled crystals derived from the real structures in the repository.

Writes ``--n`` structures as several files that ``cfdist preprocess`` reads, for scale tests of the
whole pipeline (preprocessing, shard checks, pretraining) at a million structures and beyond:

* ``extxyz`` files (``corpus-NNNNN.extxyz``): total energy, forces and stress from one pairwise
  potential (below), the scalar label ``e_form`` and the string metadata ``source_id`` / ``variant``;
* ``jsonl`` files (``corpus-NNNNN.jsonl``): JARVIS-style records ``{"id", "atoms": {lattice_mat,
  coords, elements, cartesian}, "e_form", "energy", "source_id", "variant"}`` (scalar labels only);
* ``both``: the files alternate (even file numbers extxyz, odd jsonl), so one corpus exercises both
  readers (``cfdist preprocess`` builds one format at a time: give it ``DIR/*.jsonl`` or ``DIR/*.extxyz``);
* ``corpus.yaml``: the settings, the potential's parameters, the file list and the size histogram
  (no timings, so the whole directory is a function of the command line).

Every structure is a deterministic function of ``(--seed, index)`` (its RNG is seeded from
``numpy.random.SeedSequence([seed, index])``), so the files are byte-identical whatever ``--workers``
is, and a structure's id ``syn-<seed>-<index>`` names it for good. Each one starts from a real crystal
(default: the 3,909 Materials Project crystals of ``examples/data/megnet_slice.json.gz``, read with
cfdist's own readers; ``--source`` takes any input the preprocessor reads) and goes through

1. a diagonal supercell (a x b x c, a, b, c <= 4) up to ``--max-atoms`` atoms: with probability 1/4
   the unit cell, else a log-uniform target size, so sizes span 1 .. ``--max-atoms``;
2. species substitution (probability ``--substitute``): each species, with probability 1/2, becomes
   another element of its periodic-table group (H alone; lanthanides and actinides as groups; Z <= 98),
   every site of that species alike; the cell is scaled by the ratio of the covalent radii so bond
   lengths follow the new species;
3. a random symmetric strain (components uniform in +-``--max-strain``);
4. a rattle: Gaussian displacements with a standard deviation uniform in (0, ``--rattle``] A.

A candidate with two atoms (or an atom and an image) closer than ``--min-distance``, or with a force
above ``--max-force``, is redrawn from the same RNG stream. The record's ``source_id`` (the real
crystal's id) lets ``cfdist preprocess --split-group meta:source_id`` keep every variant of one
crystal in one split.

Labels come from :class:`MorseModel`, ASE's smoothly cut Morse pair potential
(``ase.calculators.morse.MorsePotential``: the same formula, energy, forces and ASE-convention stress,
equal to rounding for one element) generalised to per-element-pair parameters derived from the covalent
radii, evaluated on cfdist's exact periodic image table in vectorised numpy (ASE's calculator costs
milliseconds per structure in its Python neighbour list; this ~0.4 ms with the table). ``e_form`` is
the Morse energy per atom relative to per-element reference energies (:meth:`MorseModel.e_form`): a
formation-energy-like scalar.

    python bench/make_corpus.py --out /tmp/cfdist-corpus --n 100000 [--seed 0] [--format jsonl]
        [--files K | --per-file M] [--workers 2] [--max-atoms 64] [--source FILE ...] [--overwrite]

    cfdist preprocess /tmp/cfdist-corpus --out data/corpus --targets e_form --split-group meta:source_id
    cfdist pretrain --config megnet_slice data.shards=data/corpus

    python bench/make_corpus.py --out /tmp/cfdist-corpus-ef --n 100000 --format extxyz
    cfdist preprocess /tmp/cfdist-corpus-ef --out data/corpus-ef --targets energy --with-forces --with-stress

It prints the atoms-per-structure histogram, the elapsed time and the rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

# One BLAS thread per process: the worker pool is the parallelism (and small matrix products are
# faster single-threaded). Set before numpy is imported; a no-op when imported by a test.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from cfdist.crystal import MAX_Z, InvalidCrystalError, validate  # noqa: E402
from cfdist.fileio import atomic_write  # noqa: E402
from cfdist.geometry import image_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO / "examples" / "data" / "megnet_slice.json.gz"
FORMATS = ("extxyz", "jsonl", "both")
SUFFIX = {"extxyz": ".extxyz", "jsonl": ".jsonl"}
HIST_EDGES = (1, 2, 5, 9, 17, 33, 49, 65, 129)  # bucket k holds sizes edges[k] .. edges[k+1]-1; last: >= 129
MAX_FACTOR = 4  # supercell multiplier per axis


# ----------------------------------------------------------------------------- elements


def _group(z: int) -> str:
    """Periodic-table group of element ``z`` as a key: "1".."18", "Ln", "An", or "H" (hydrogen alone:
    swapping it for an alkali metal is not chemistry)."""
    if z == 1:
        return "H"
    if z == 2:
        return "18"
    start = max(s for s in (3, 11, 19, 37, 55, 87) if s <= z)  # first element of z's period
    k = z - start
    if start in (3, 11):  # periods 2-3: groups 1, 2, then 13-18
        return str(k + 1 if k < 2 else k + 11)
    if start in (19, 37):  # periods 4-5: all 18 groups
        return str(k + 1)
    if k < 2:
        return str(k + 1)
    if start == 87:
        return "An"  # Ac .. Cf (Z <= 98)
    return "Ln" if z <= 71 else str(k - 13)  # period 6: La..Lu, then Hf (group 4) .. Rn (18)


def group_members(max_z: int = MAX_Z) -> dict[str, tuple[int, ...]]:
    """Elements 1..``max_z`` by :func:`_group` key."""
    out: dict[str, list[int]] = {}
    for z in range(1, max_z + 1):
        out.setdefault(_group(z), []).append(z)
    return {k: tuple(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- the potential


def fcut(r: np.ndarray, r1: np.ndarray, r2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASE's quintic smooth cutoff (``ase.calculators.morse.fcut`` / ``fcut_d``) and its derivative:
    1 below ``r1``, 0 above ``r2``, C2 in between.

    With s = (r2 - r) / (r2 - r1) clipped to [0, 1]: fc = s^3 (10 - 15 s + 6 s^2) and
    d fc / d r = -30 s^2 (1 - s)^2 / (r2 - r1); the clip gives exactly 1 and 0 (and a zero
    derivative) outside the shell without ASE's three masks.
    """
    width = r2 - r1
    s = np.clip((r2 - r) / width, 0.0, 1.0)
    s2 = s * s
    return s2 * s * (10.0 + s * (6.0 * s - 15.0)), (-30.0 * s2) * (1.0 - s) ** 2 / width


@dataclass(frozen=True, eq=False)
class MorseModel:
    """A Morse pair potential with per-element-pair parameters, ASE's functional form.

    Pair (i, j) at distance d: V = eps_ij fc(d) [exp(-2 rho0 (d/r0_ij - 1)) - 2 exp(-rho0 (d/r0_ij - 1))],
    fc ASE's quintic cutoff from ``rcut1 * r0_ij`` to ``rcut2 * r0_ij``. E = 1/2 sum over ordered pairs
    (i, j, image n) != (i, i, 0); forces -dE/dr_i; stress (1/V) dE/d(strain) in eV/A^3 (ASE's sign).

    Parameters per element Z (deterministic, from ``ase.data.covalent_radii``, Cordero et al. 2008):
    radius r_Z = ``bond_scale`` x covalent radius (0.95: the median nearest-neighbour distance in the
    MEGNet slice is 0.95 x the sum of covalent radii), well depth e_Z = 1 eV / (1 + r_Z / A) (small
    atoms bind harder; noble gases x 0.1); pairs: r0_ij = r_i + r_j, eps_ij = sqrt(e_i e_j). With a
    single element it is exactly ``MorsePotential(epsilon=e_Z, r0=2 r_Z, rho0=rho0, rcut1=rcut1,
    rcut2=rcut2)``. ``rho0`` 3.5 (ASE's default is 6) keeps the forces of rattled, strained and
    substituted crystals moderate (median max |F| ~0.7 eV/A).
    """

    rho0: float = 3.5
    rcut1: float = 1.4
    rcut2: float = 1.75
    bond_scale: float = 0.95
    radius: np.ndarray = field(default=None, repr=False)  # (MAX_Z + 1,) A, index = Z
    depth: np.ndarray = field(default=None, repr=False)  # (MAX_Z + 1,) eV

    def __post_init__(self):
        if self.radius is None or self.depth is None:
            from ase.data import covalent_radii

            radius = np.zeros(MAX_Z + 1)
            radius[1:] = self.bond_scale * covalent_radii[1:MAX_Z + 1]
            depth = np.zeros(MAX_Z + 1)
            depth[1:] = 1.0 / (1.0 + radius[1:])
            for z in group_members()["18"]:
                depth[z] *= 0.1  # closed shells: weakly bound
            object.__setattr__(self, "radius", radius if self.radius is None else np.asarray(self.radius, float))
            object.__setattr__(self, "depth", depth if self.depth is None else np.asarray(self.depth, float))
        if not 0 < self.rcut1 < self.rcut2:
            raise ValueError(f"need 0 < rcut1 < rcut2, got {self.rcut1}, {self.rcut2}")

    def reference(self) -> np.ndarray:
        """(MAX_Z + 1,) per-element reference energies mu_Z = -3 e_Z (eV/atom) for :meth:`e_form`
        (roughly the Morse energy per atom of a close-packed element at its equilibrium spacing)."""
        return -3.0 * self.depth

    def e_form(self, numbers: np.ndarray, energy: float) -> float:
        """Formation-energy-like label: E/N - mean_i mu_{Z_i} (eV/atom)."""
        return float(energy / len(numbers) - self.reference()[numbers].mean())

    def max_cutoff(self, numbers: np.ndarray) -> float:
        """The largest pair cutoff among the species present (A)."""
        return float(2.0 * self.radius[numbers].max() * self.rcut2)

    def evaluate(self, numbers, lattice, positions, *, min_distance: float = 0.0
                 ) -> tuple[float, np.ndarray, np.ndarray, float] | None:
        """(energy eV, forces (N, 3) eV/A, stress (3, 3) eV/A^3, shortest distance A), or None when
        two atoms (or an atom and a periodic image) are closer than ``min_distance``.

        ``lattice`` rows are the lattice vectors; positions are Cartesian (A). Pairs come from
        cfdist's exact image table (every image within the largest pair cutoff), so the sums run
        over the same entries, in the same order, on every machine.
        """
        numbers = np.asarray(numbers, dtype=np.int64)
        lattice = np.asarray(lattice, dtype=np.float64)
        positions = np.asarray(positions, dtype=np.float64)
        n_atoms = len(numbers)
        table = image_table(lattice, positions, max(self.max_cutoff(numbers), min_distance))
        i, j = table.i, table.j
        vec = positions[j] - positions[i] + table.n @ lattice  # D_ij = p_j + n L - p_i
        d2 = np.einsum("tx,tx->t", vec, vec)
        # d2 == 0 exactly only for the self entries (i, i, 0), one per atom; any other is an overlap
        zero = d2 == 0.0
        n_zero = int(np.count_nonzero(zero))
        if n_zero > n_atoms:
            return None
        d2_pos = d2[~zero] if n_zero else d2
        shortest = float(np.sqrt(d2_pos.min())) if len(d2_pos) else math.inf
        if shortest < min_distance:
            return None
        rad = self.radius[numbers]
        r0 = rad[i] + rad[j]
        keep = ~zero & (d2 < (self.rcut2 * r0) ** 2)  # beyond rcut2 * r0: fc = 0 exactly
        i, j, vec, d2, r0 = i[keep], j[keep], vec[keep], d2[keep], r0[keep]
        d = np.sqrt(d2)
        root = np.sqrt(self.depth[numbers])
        eps = root[i] * root[j]
        expf = np.exp(self.rho0 * (1.0 - d / r0))
        fc, dfc = fcut(d, self.rcut1 * r0, self.rcut2 * r0)
        pair = eps * expf * (expf - 2.0)
        energy = 0.5 * float(np.dot(pair, fc))
        de = ((-2.0 * self.rho0) * eps / r0 * expf * (expf - 1.0)) * fc + pair * dfc  # dV/dd
        de_vec = vec * (de / d)[:, None]
        forces = np.stack([np.bincount(i, weights=de_vec[:, k], minlength=n_atoms) for k in range(3)], axis=1)
        (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = lattice.tolist()  # np.linalg.det costs ~20x more
        volume = abs(a0 * (b1 * c2 - b2 * c1) - a1 * (b0 * c2 - b2 * c0) + a2 * (b0 * c1 - b1 * c0))
        virial = vec.T @ de_vec  # symmetric up to rounding; made exactly so (ASE averages the pairs on reading)
        stress = 0.25 * (virial + virial.T) / volume
        return energy, forces, stress, shortest


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A real crystal the corpus is derived from."""

    id: str
    numbers: np.ndarray
    lattice: np.ndarray
    positions: np.ndarray


def load_sources(paths: Sequence[str | Path], *, max_atoms: int, min_distance: float,
                 verbose: bool = True) -> list[Source]:
    """Every ordered, valid crystal of ``paths`` (any input ``cfdist preprocess`` reads) with at most
    ``max_atoms`` atoms and no two atoms closer than ``min_distance``, in input order.

    Records that fail (unreadable, disordered, too large, too close atoms) are skipped and counted."""
    from cfdist.io import default_id, expand_inputs, infer_format, plan_chunks, read_chunk
    from cfdist.preprocess.job import lll_reduced

    sources: list[Source] = []
    skipped: dict[str, int] = {}
    for path in expand_inputs([str(p) for p in paths]):
        fmt = infer_format(path)
        for chunk in plan_chunks(path, fmt, chunk_size=1 << 30):
            for rec in read_chunk(chunk):
                reason = rec.error_reason
                if reason is None:
                    c = rec.crystal
                    if c.disorder is not None and len(c.disorder):
                        reason = "disordered"
                    elif c.n_atoms > max_atoms:
                        reason = f"more than {max_atoms} atoms"
                    else:
                        try:
                            validate(c, min_distance=min_distance)
                        except InvalidCrystalError as exc:
                            reason = exc.reason
                if reason is not None:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                # LLL-reduced basis, positions wrapped into it: a skewed basis makes image tables
                # (and the supercells built along its vectors) needlessly expensive
                c = lll_reduced(c)
                frac = c.positions @ np.linalg.inv(c.lattice)
                positions = (frac - np.floor(frac)) @ c.lattice
                sources.append(Source(rec.id or default_id(path, rec.index), c.numbers.copy(), c.lattice.copy(),
                                      positions))
    if not sources:
        raise SystemExit(f"no usable source structure in {[str(p) for p in paths]} (skipped: {skipped})")
    if verbose:
        note = f" (skipped {sum(skipped.values())}: {skipped})" if skipped else ""
        print(f"sources: {len(sources):,} real crystals from {', '.join(map(str, paths))}{note}", flush=True)
    return sources


# ----------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class Settings:
    """Everything that decides the corpus besides the sources (stored in corpus.yaml)."""

    seed: int = 0
    max_atoms: int = 64
    min_distance: float = 0.7
    max_strain: float = 0.03
    rattle: float = 0.05
    substitute: float = 0.5
    max_force: float = 30.0
    max_tries: int = 100

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.max_atoms < 1:
            raise ValueError(f"max_atoms must be >= 1, got {self.max_atoms}")
        if not 0.0 <= self.substitute <= 1.0:
            raise ValueError(f"substitute is a probability, got {self.substitute}")
        if self.max_strain < 0 or self.rattle < 0 or self.min_distance < 0:
            raise ValueError("max_strain, rattle and min_distance must be >= 0")
        if not self.max_force > 0:
            raise ValueError(f"max_force must be > 0, got {self.max_force}")


@dataclass
class Structure:
    """One generated, labelled structure (positions and lattice rounded to 1e-8 A, as written)."""

    id: str
    source_id: str
    variant: str
    numbers: np.ndarray
    lattice: np.ndarray
    positions: np.ndarray
    energy: float
    forces: np.ndarray
    stress: np.ndarray
    e_form: float


def _supercells() -> dict[int, list[tuple[int, int, int]]]:
    """Diagonal multipliers (a, b, c), 1 <= a, b, c <= MAX_FACTOR, by product."""
    out: dict[int, list[tuple[int, int, int]]] = {}
    for a in range(1, MAX_FACTOR + 1):
        for b in range(1, MAX_FACTOR + 1):
            for c in range(1, MAX_FACTOR + 1):
                out.setdefault(a * b * c, []).append((a, b, c))
    return out


_SUPERCELLS = _supercells()
_SHIFTS = {m: np.stack(np.meshgrid(*[np.arange(k, dtype=np.float64) for k in m], indexing="ij"), -1).reshape(-1, 3)
           for ms in _SUPERCELLS.values() for m in ms}  # the cell translations of each supercell
_PRODUCTS = np.array(sorted(_SUPERCELLS))
_GROUPS = group_members()
_GROUP_OF = {z: _group(z) for z in range(1, MAX_Z + 1)}


class Generator:
    """Makes structure ``index`` of a corpus: a pure function of (sources, settings, index)."""

    def __init__(self, sources: Sequence[Source], settings: Settings, model: MorseModel | None = None):
        self.sources = list(sources)
        self.settings = settings
        self.model = model or MorseModel()

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.settings.seed, index]))

    def _multiplier(self, rng: np.random.Generator, n_atoms: int) -> tuple[int, int, int]:
        cap = self.settings.max_atoms // n_atoms
        if cap <= 1 or rng.random() < 0.25:
            return (1, 1, 1)
        # log-uniform target size between the unit cell and the cap, then the largest product below it
        target = math.exp(rng.uniform(0.0, math.log(cap + 1)))
        product = int(_PRODUCTS[_PRODUCTS <= min(target, cap)].max())
        choices = _SUPERCELLS[product]
        return choices[int(rng.integers(len(choices)))]

    def _substitute(self, rng: np.random.Generator, numbers: np.ndarray) -> tuple[np.ndarray, list[str]]:
        out = numbers.copy()
        swaps = []
        for z in np.unique(numbers).tolist():
            members = _GROUPS[_GROUP_OF[z]]
            if len(members) < 2 or rng.random() >= 0.5:
                continue
            new = members[int(rng.integers(len(members) - 1))]
            new = new if new != z else members[-1]  # uniform over the group's other elements
            out[numbers == z] = new
            swaps.append(f"{z}>{new}")
        return out, swaps

    def candidate(self, rng: np.random.Generator, source: Source):
        """One draw of (numbers, lattice, positions, variant) from ``source`` (not yet checked)."""
        s = self.settings
        mult = self._multiplier(rng, len(source.numbers))
        shifts = _SHIFTS[mult]
        lattice = source.lattice * np.array(mult, dtype=np.float64)[:, None]
        positions = (source.positions[None, :, :] + (shifts @ source.lattice)[:, None, :]).reshape(-1, 3)
        numbers = np.tile(source.numbers, len(shifts))
        variant = [f"{mult[0]}x{mult[1]}x{mult[2]}"]
        if s.substitute > 0 and rng.random() < s.substitute:
            new, swaps = self._substitute(rng, numbers)
            if swaps:
                # bond lengths follow the new species: scale the cell by the ratio of summed radii
                scale = self.model.radius[new].sum() / self.model.radius[numbers].sum()
                numbers, lattice, positions = new, lattice * scale, positions * scale
                variant.append("sub:" + ",".join(swaps))
        eps = rng.uniform(-s.max_strain, s.max_strain, size=(3, 3))
        deform = np.eye(3) + 0.5 * (eps + eps.T)
        lattice, positions = lattice @ deform, positions @ deform
        sigma = s.rattle * (1.0 - rng.random())  # (0, rattle]
        positions = positions + rng.normal(0.0, sigma, size=positions.shape)
        return numbers, np.round(lattice, 8), np.round(positions, 8), ";".join(variant)

    def structure(self, index: int) -> Structure:
        rng = self.rng(index)
        s = self.settings
        for _ in range(s.max_tries):
            source = self.sources[int(rng.integers(len(self.sources)))]
            numbers, lattice, positions, variant = self.candidate(rng, source)
            result = self.model.evaluate(numbers, lattice, positions, min_distance=s.min_distance)
            if result is not None and np.einsum("ix,ix->i", result[1], result[1]).max() <= s.max_force ** 2:
                energy, forces, stress, _ = result
                return Structure(f"syn-{s.seed}-{index}", source.id, variant, numbers, lattice, positions,
                                 energy, forces, stress, self.model.e_form(numbers, energy))
        raise RuntimeError(f"structure {index}: no candidate without atoms closer than {s.min_distance} A and "
                           f"forces within {s.max_force} eV/A in {s.max_tries} draws; lower --min-distance or "
                           f"--rattle, or raise --max-force")


# ----------------------------------------------------------------------------- writers

_SYMBOLS: list[str] = []


def _symbols() -> list[str]:
    if not _SYMBOLS:
        from ase.data import chemical_symbols

        _SYMBOLS.extend(chemical_symbols)
    return _SYMBOLS


def _quoted(text: str) -> str:
    if any(c in text for c in '"\\\n'):
        raise ValueError(f"cannot write {text!r} as an extxyz string")
    return f'"{text}"'


def format_extxyz(s: Structure) -> str:
    """One extxyz frame in ASE's layout (``ase.io.read`` gives a SinglePointCalculator with energy,
    forces and the 3x3 stress; ``e_form`` a float and ``id`` / ``source_id`` / ``variant`` strings in ``info``)."""
    sym = _symbols()
    n = len(s.numbers)
    lattice = " ".join(f"{x:.8f}" for x in s.lattice.ravel().tolist())
    stress = " ".join(repr(x) for x in s.stress.ravel().tolist())
    header = (f'{n}\nLattice="{lattice}" Properties=species:S:1:pos:R:3:forces:R:3 energy={s.energy!r} '
              f'stress="{stress}" e_form={s.e_form!r} id={_quoted(s.id)} source_id={_quoted(s.source_id)} '
              f'variant={_quoted(s.variant)} pbc="T T T"\n')
    # one % operation for all atoms (a per-line loop costs ~3x more)
    rows = np.concatenate([s.positions, s.forces], axis=1).tolist()
    flat = [v for z, row in zip(s.numbers.tolist(), rows) for v in (sym[z], *row)]
    return header + ("%-2s %.8f %.8f %.8f %.10f %.10f %.10f\n" * n) % tuple(flat)


def format_jsonl(s: Structure) -> str:
    """One JARVIS-style JSON line (Cartesian coordinates; labels ``e_form`` eV/atom, ``energy`` eV)."""
    sym = _symbols()
    record = {"id": s.id, "atoms": {"lattice_mat": s.lattice.tolist(), "coords": s.positions.tolist(),
                                    "elements": [sym[z] for z in s.numbers.tolist()], "cartesian": True},
              "e_form": s.e_form, "energy": s.energy, "source_id": s.source_id, "variant": s.variant}
    return json.dumps(record, separators=(",", ":")) + "\n"


_FORMATTERS = {"extxyz": format_extxyz, "jsonl": format_jsonl}


# ----------------------------------------------------------------------------- corpus layout


@dataclass(frozen=True)
class FileSpec:
    """One output file: structures ``start .. stop - 1`` in format ``fmt``."""

    name: str
    fmt: str
    start: int
    stop: int


def plan_files(n: int, fmt: str, files: int | None = None, per_file: int = 100_000) -> list[FileSpec]:
    """Split indices 0..n-1 into contiguous files: ``max(files, ceil(n / per_file))`` of them (``both``:
    at least 2), as even as possible; ``both`` alternates extxyz (even file numbers) and jsonl (odd)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if n < 1 or per_file < 1:
        raise ValueError(f"n and per_file must be >= 1, got {n} and {per_file}")
    k = max(files or 1, math.ceil(n / per_file), 2 if fmt == "both" else 1)
    if k > n:
        raise ValueError(f"{k} files for {n} structures: every file needs at least one")
    out = []
    for f in range(k):
        kind = fmt if fmt != "both" else ("extxyz", "jsonl")[f % 2]
        out.append(FileSpec(f"corpus-{f:05d}{SUFFIX[kind]}", kind, n * f // k, n * (f + 1) // k))
    return out


def _blocks(spec: FileSpec, block: int) -> list[tuple[int, int, str]]:
    return [(a, min(a + block, spec.stop), spec.fmt) for a in range(spec.start, spec.stop, block)]


_WORKER: Generator | None = None


def _init_worker(sources, settings, model) -> None:
    global _WORKER
    # a forked worker inherits the parent's handlers; Pool.terminate() ends workers with SIGTERM,
    # which must not meet a handler that defers it (e.g. a training run's stop-at-next-step one)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER = Generator(sources, settings, model)


def _make_block(task: tuple[int, int, str]) -> tuple[bytes, np.ndarray]:
    """Text of structures ``start .. stop - 1`` and their atom counts (in a worker)."""
    start, stop, fmt = task
    write = _FORMATTERS[fmt]
    parts, sizes = [], np.empty(stop - start, dtype=np.int64)
    for k, index in enumerate(range(start, stop)):
        s = _WORKER.structure(index)
        parts.append(write(s))
        sizes[k] = len(s.numbers)
    return "".join(parts).encode("utf-8"), sizes


def size_histogram(sizes: np.ndarray) -> list[tuple[str, int]]:
    """(bucket label, count) over :data:`HIST_EDGES`."""
    counts = np.histogram(sizes, bins=list(HIST_EDGES) + [max(int(sizes.max()) + 1, HIST_EDGES[-1] + 1)])[0]
    labels = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(HIST_EDGES[:-1], HIST_EDGES[1:])]
    labels.append(f">={HIST_EDGES[-1]}")
    return list(zip(labels, counts.tolist()))


def generate(out: str | Path, n: int, *, settings: Settings = Settings(), fmt: str = "jsonl",
             files: int | None = None, per_file: int = 100_000, workers: int = 1, sources: Sequence[Source] = (),
             block: int = 500, overwrite: bool = False, progress: bool = True,
             model: MorseModel | None = None, sources_from: Sequence[str] = ()) -> dict:
    """Write the corpus under ``out`` and return its summary (also written to ``out/corpus.yaml``).

    ``sources_from``: where ``sources`` were read (recorded in the summary).

    Each file is written atomically (complete or absent). Existing corpus files in ``out`` are
    refused unless ``overwrite`` (then they and ``corpus.yaml`` are removed first).
    """
    import yaml
    from tqdm import tqdm

    out = Path(out)
    if not sources:
        raise ValueError("no sources: load them with load_sources()")
    if workers < 1 or block < 1:
        raise ValueError(f"workers and block must be >= 1, got {workers} and {block}")
    specs = plan_files(n, fmt, files, per_file)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out.glob("corpus-*") if p.suffix in SUFFIX.values())
    if existing and not overwrite:
        raise SystemExit(f"{out} already holds {len(existing)} corpus file(s) ({existing[0].name}, ...); "
                         f"pass --overwrite to replace them")
    # start clean: a run that dies part-way leaves only complete files of its own, never old ones beside them
    for stale in [*existing, out / "corpus.yaml"]:
        stale.unlink(missing_ok=True)
    model = model or MorseModel()
    tasks = [t for spec in specs for t in _blocks(spec, block)]
    sizes = np.empty(n, dtype=np.int64)
    bar = tqdm(total=n, unit="struct", desc="corpus", mininterval=1.0, disable=not progress, file=sys.stderr)
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker,
                                                 initargs=(list(sources), settings, model))
        # ordered: each file's blocks arrive in index order, so the bytes never depend on scheduling
        results: Iterator = pool.imap(_make_block, tasks, chunksize=1)
    else:
        _init_worker(list(sources), settings, model)
        results = map(_make_block, tasks)
    try:
        for spec in specs:
            with atomic_write(out / spec.name) as tmp, open(tmp, "wb") as fh:
                for start, stop, _ in _blocks(spec, block):
                    data, block_sizes = next(results)
                    fh.write(data)
                    sizes[start:stop] = block_sizes
                    bar.update(stop - start)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    summary = {
        "n": n, "format": fmt, "settings": asdict(settings),
        "potential": {"kind": "Morse, ase.calculators.morse form, per element pair", "rho0": model.rho0,
                      "rcut1": model.rcut1, "rcut2": model.rcut2, "bond_scale": model.bond_scale,
                      "radius": "bond_scale x ase.data.covalent_radii", "r0": "radius_i + radius_j",
                      "depth": "1 eV / (1 + radius / A), noble gases x 0.1", "epsilon": "sqrt(depth_i depth_j)",
                      "e_form": "E / N + 3 mean(depth)"},
        "sources": {"from": [str(p) for p in sources_from], "crystals": len(sources)},
        "files": [{"name": s.name, "format": s.fmt, "first": s.start, "count": s.stop - s.start} for s in specs],
        "atoms_histogram": dict(size_histogram(sizes)),
        "atoms": {"min": int(sizes.min()), "max": int(sizes.max()), "mean": round(float(sizes.mean()), 3),
                  "median": float(np.median(sizes))},
    }
    with atomic_write(out / "corpus.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def print_summary(summary: dict, elapsed: float, workers: int, load_time: float = 0.0) -> None:
    n = summary["n"]
    print("\n| atoms per structure | structures | share |\n|---|---:|---:|")
    for label, count in summary["atoms_histogram"].items():
        print(f"| {label} | {count:,} | {100.0 * count / n:.1f} % |")
    a = summary["atoms"]
    print(f"\natoms: min {a['min']}, median {a['median']:g}, mean {a['mean']:.1f}, max {a['max']}")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    print(f"{n:,} structures in {len(summary['files'])} file(s) in {elapsed:.1f} s (+ {load_time:.1f} s reading the "
          f"sources): {n / elapsed:,.0f} structures/s with {workers} worker(s) (load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path,
                        help="output directory (keep big corpora out of the repository)")
    parser.add_argument("--n", required=True, type=int, help="number of structures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=FORMATS, default="jsonl",
                        help="jsonl (labels e_form, energy), extxyz (energy, forces, stress, e_form) or both "
                             "(files alternate; preprocess each format separately)")
    parser.add_argument("--files", type=int, default=None,
                        help="at least this many files (default: as many as --per-file needs)")
    parser.add_argument("--per-file", type=int, default=100_000, help="at most this many structures per file")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes (the output is identical for any number)")
    parser.add_argument("--source", nargs="+", default=[str(DEFAULT_SOURCE)],
                        help="real structures to derive from (any input cfdist preprocess reads; default: the "
                             "MEGNet slice)")
    parser.add_argument("--max-atoms", type=int, default=64, help="largest supercell (atoms)")
    parser.add_argument("--min-distance", type=float, default=0.7,
                        help="redraw candidates with atoms closer than this (A)")
    parser.add_argument("--max-strain", type=float, default=0.03, help="strain components uniform in +-this")
    parser.add_argument("--rattle", type=float, default=0.05, help="largest Gaussian displacement std (A)")
    parser.add_argument("--substitute", type=float, default=0.5, help="probability of a species substitution")
    parser.add_argument("--max-force", type=float, default=30.0,
                        help="redraw candidates with a force above this (eV/A)")
    parser.add_argument("--block", type=int, default=500, help="structures per worker task")
    parser.add_argument("--overwrite", action="store_true", help="replace corpus files already in --out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = Settings(seed=args.seed, max_atoms=args.max_atoms, min_distance=args.min_distance,
                            max_strain=args.max_strain, rattle=args.rattle, substitute=args.substitute,
                            max_force=args.max_force)
        plan_files(args.n, args.format, args.files, args.per_file)  # argument errors before reading sources
        if args.workers < 1 or args.block < 1:
            raise ValueError(f"--workers and --block must be >= 1, got {args.workers} and {args.block}")
    except ValueError as exc:
        parser.error(str(exc))
    t0 = time.perf_counter()
    sources = load_sources(args.source, max_atoms=args.max_atoms, min_distance=args.min_distance)
    t1 = time.perf_counter()
    summary = generate(args.out, args.n, settings=settings, fmt=args.format, files=args.files, per_file=args.per_file,
                       workers=args.workers, sources=sources, block=args.block, overwrite=args.overwrite,
                       progress=not args.no_progress, sources_from=args.source)
    print_summary(summary, time.perf_counter() - t1, args.workers, t1 - t0)
    print(f"written to {args.out}/ (corpus.yaml: settings, files, histogram)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
