"""Lattice-image tables: every (i, j, n) with |p_j + n L - p_i| <= r_c (docs/model.md, Image tables).

A table is three integer arrays ``i`` (T,), ``j`` (T,) and ``n`` (T, 3), sorted by
(i, j, n). Lattice ``L`` is (3, 3) with the lattice vectors as **rows** (pymatgen's
``lattice.matrix``); positions are Cartesian (N, 3) in A and need not be wrapped.

Algorithm (vectorised numpy, exact):
  1. Wrap positions into the cell: p_i = w_i + m_i L with fractional w in [0, 1).
  2. Centre each pair: r'_ij = w_j - w_i + s_ij L with s_ij = -round(frac(w_j - w_i)),
     so r'_ij lies in the cell parallelepiped centred on 0 (|r'_ij| <= rho).
  3. Candidate translations: all lattice points with |c L| <= r_c + rho. Every image
     within r_c of any pair is among them (triangle inequality).
  4. Test all (pair, candidate) distances, then map back to the caller's unwrapped
     positions: n = c + s_ij - m_j + m_i, and re-test with the plain formula
     |p_j + n L - p_i| <= r_c so the result equals a brute-force enumeration bit for bit.
Work is chunked over query atoms so memory stays bounded for 1,000-atom cells.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

# Candidate (pair x translation) distance tests per chunk: bounds peak memory (~150 MB).
_CHUNK_TESTS = 2_000_000
# Slack on the candidate sphere so rounding never loses an image that the exact test keeps.
_SLACK = 1e-6


@dataclass(frozen=True)
class ImageTable:
    """Integer image table of one structure, sorted by (i, j, n).

    Attributes:
        i: (T,) int64 query (centre) atom of each entry.
        j: (T,) int64 key (neighbour) atom.
        n: (T, 3) int64 lattice translation; the image is p_j + n @ L.
        cutoff: the radius r_c (A) the table was built with.
        d2: optional (T,) squared distances as computed during enumeration (accurate to
            ~1e-12 A^2; use :meth:`distances` for exact values).
    """

    i: np.ndarray
    j: np.ndarray
    n: np.ndarray
    cutoff: float
    d2: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.i.shape[0])

    def distances(self, lattice: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """(T,) float64 distances |p_j + n L - p_i| of every entry."""
        return np.linalg.norm(image_vectors(lattice, positions, self.i, self.j, self.n), axis=-1)


def image_vectors(lattice, positions, i, j, n) -> np.ndarray:
    """(T, 3) vectors p_j + n L - p_i (the one formula every exactness check uses)."""
    lattice = np.asarray(lattice, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64)
    return positions[j] + n @ lattice - positions[i]


def image_table(lattice, positions, cutoff: float) -> ImageTable:
    """Every image (i, j, n) with |p_j + n L - p_i| <= ``cutoff``, self images included.

    Args:
        lattice: (3, 3) lattice vectors as rows (A). Left-handed bases are fine.
        positions: (N, 3) Cartesian positions (A), wrapped or not.
        cutoff: r_c in A (use :func:`cfdist.config.table_cutoff` for a model's value).

    Returns:
        :class:`ImageTable` sorted by (i, j, n).
    """
    lattice = np.ascontiguousarray(lattice, dtype=np.float64)
    positions = np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3)
    if lattice.shape != (3, 3):
        raise ValueError(f"lattice must be (3, 3), got {lattice.shape}")
    if not (np.isfinite(cutoff) and cutoff >= 0):
        raise ValueError(f"cutoff must be finite and >= 0, got {cutoff}")
    n_atoms = positions.shape[0]
    if n_atoms == 0:
        empty = np.zeros(0, dtype=np.int64)
        return ImageTable(empty, empty.copy(), np.zeros((0, 3), dtype=np.int64), float(cutoff))

    inverse = inverse_lattice(lattice)  # frac = cart @ inverse
    frac = positions @ inverse
    wrap_shift = np.floor(frac)  # m_i
    wrapped_frac = frac - wrap_shift
    pair_frac = wrapped_frac[None, :, :] - wrapped_frac[:, None, :]  # (N, N, 3), entries in (-1, 1)
    centre_shift = -np.round(pair_frac)  # s_ij
    centred = ((pair_frac + centre_shift) @ lattice).reshape(-1, 3)  # r'_ij, pair p = i*N + j
    # n = c + s_ij - m_j + m_i maps a candidate c of the centred pair back to the caller's positions.
    pair_shift = (centre_shift - wrap_shift[None, :, :] + wrap_shift[:, None, :]).astype(np.int64).reshape(-1, 3)
    centred_sq = np.einsum("px,px->p", centred, centred)
    reach = float(np.sqrt(centred_sq.max()))

    candidates, candidate_vecs, candidate_sq = _lattice_points_within(lattice, inverse, cutoff + reach + _SLACK)
    n_candidates = candidates.shape[0]

    loose = (cutoff + _SLACK) ** 2
    sure = max(cutoff - _SLACK, 0.0) ** 2
    chunk = max(1, _CHUNK_TESTS // max(1, n_candidates))
    twice_vecs_t = 2.0 * candidate_vecs.T
    found_pc, found_d2 = [], []
    for start in range(0, centred.shape[0], chunk):
        # |r' + cL|^2 = |r'|^2 + |cL|^2 + 2 r'.cL: the heavy part is one BLAS product. Its
        # rounding error (~1e-12 A^2) is far inside _SLACK; borderline hits are re-tested below.
        d2 = centred[start:start + chunk] @ twice_vecs_t
        d2 += centred_sq[start:start + chunk, None]
        d2 += candidate_sq[None, :]
        flat = np.flatnonzero(d2 <= loose)  # (pair, candidate) row-major; 4x cheaper than 2-D nonzero
        found_d2.append(d2.ravel().take(flat))
        found_pc.append(flat + start * n_candidates)
    pc = found_pc[0] if len(found_pc) == 1 else np.concatenate(found_pc)
    approx_d2 = found_d2[0] if len(found_d2) == 1 else np.concatenate(found_d2)
    p, c = np.divmod(pc, n_candidates)
    n = candidates.take(c, axis=0)
    n += pair_shift.take(p, axis=0)
    i, j = np.divmod(p, n_atoms)

    # Decide entries within _SLACK of the sphere with the plain formula on the caller's
    # positions, so the table equals a brute-force enumeration exactly.
    # Flat indices come in (i, j, candidate) order; candidates are lexicographically sorted
    # and the per-pair shift is constant, so (i, j, n) order already holds.
    border = np.nonzero(approx_d2 > sure)[0] if len(approx_d2) and approx_d2.max() > sure else ()
    if len(border):
        d = image_vectors(lattice, positions, i[border], j[border], n[border])
        outside = border[np.einsum("tx,tx->t", d, d) > cutoff * cutoff]
        if outside.size:  # rare: only entries within _SLACK beyond the sphere
            keep = np.ones(len(p), dtype=bool)
            keep[outside] = False
            i, j, n, approx_d2 = i[keep], j[keep], n[keep], approx_d2[keep]
    return ImageTable(i, j, n, float(cutoff), approx_d2)


def inverse_lattice(lattice: np.ndarray) -> np.ndarray:
    """Inverse of a (3, 3) lattice by cofactors (np.linalg.inv costs ~60 us per call)."""
    (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = lattice.tolist()
    cof = np.array([
        [b1 * c2 - b2 * c1, c1 * a2 - c2 * a1, a1 * b2 - a2 * b1],
        [b2 * c0 - b0 * c2, c2 * a0 - c0 * a2, a2 * b0 - a0 * b2],
        [b0 * c1 - b1 * c0, c0 * a1 - c1 * a0, a0 * b1 - a1 * b0],
    ])  # columns of cof are b x c, c x a, a x b
    det = a0 * cof[0, 0] + a1 * cof[1, 0] + a2 * cof[2, 0]
    return cof / det


def _lattice_points_within(lattice: np.ndarray, inverse: np.ndarray,
                           radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Translations c with |c L| <= radius in lexicographic order: (C, 3) int64 c, (C, 3) c L
    and (C,) |c L|^2."""
    # |c L| <= radius implies |c_l| = |(c L) . inverse[:, l]| <= radius * |inverse[:, l]|.
    b0, b1, b2 = (int(radius * math.sqrt(x * x + y * y + z * z) + 1e-9) for x, y, z in inverse.T.tolist())
    grid = _integer_box(b0, b1, b2)
    vecs = grid @ lattice
    sq = np.einsum("cx,cx->c", vecs, vecs)
    inside = np.flatnonzero(sq <= radius * radius)
    return grid.take(inside, axis=0), vecs.take(inside, axis=0), sq.take(inside)


@functools.lru_cache(maxsize=1024)
def _integer_box(b0: int, b1: int, b2: int) -> np.ndarray:
    """All integer vectors in [-b0, b0] x [-b1, b1] x [-b2, b2], lexicographic (read-only)."""
    grid = np.stack(np.meshgrid(np.arange(-b0, b0 + 1), np.arange(-b1, b1 + 1), np.arange(-b2, b2 + 1),
                                indexing="ij"), axis=-1).reshape(-1, 3).astype(np.int64)
    grid.setflags(write=False)
    return grid


def brute_force_image_table(lattice, positions, cutoff: float) -> ImageTable:
    """Slow, obviously-correct enumeration for tests: a per-pair box wide enough for r_c."""
    lattice = np.asarray(lattice, dtype=np.float64)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    inverse = np.linalg.inv(lattice)
    heights_inv = np.linalg.norm(inverse, axis=0)
    rows = []
    for a in range(len(positions)):
        for b in range(len(positions)):
            f = (positions[b] - positions[a]) @ inverse
            lo = np.floor(-f - cutoff * heights_inv) - 1
            hi = np.ceil(-f + cutoff * heights_inv) + 1
            grid = np.stack(np.meshgrid(*[np.arange(l, h + 1) for l, h in zip(lo, hi)], indexing="ij"), -1)
            grid = grid.reshape(-1, 3).astype(np.int64)
            d = positions[b] + grid @ lattice - positions[a]
            for n in grid[np.einsum("tx,tx->t", d, d) <= cutoff * cutoff]:
                rows.append((a, b, *n))
    rows.sort()
    arr = np.array(rows, dtype=np.int64).reshape(-1, 5)
    return ImageTable(arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2:].copy(), float(cutoff))


def interplanar_spacings(lattice) -> np.ndarray:
    """(3,) distances h_l between lattice planes spanned by the other two vectors (A)."""
    return 1.0 / np.linalg.norm(np.linalg.inv(np.asarray(lattice, dtype=np.float64)), axis=0)
