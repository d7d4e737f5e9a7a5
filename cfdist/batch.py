"""Batching: concatenate crystals and their image tables into one flat batch.

All per-atom and per-entry arrays are concatenated with global indices (atom index
offsets added to the tables) in a handful of vectorised numpy calls; the only Python
loop runs over structures, never over atoms, pairs or table entries.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from cfdist.geometry import ImageTable

if TYPE_CHECKING:
    from cfdist.crystal import Crystal


@dataclass
class CrystalBatch:
    """A batch of B crystals with N atoms, S species entries and T table entries in all.

    Attributes:
        positions: (N, 3) Cartesian positions (A), float64 until moved with :meth:`to`.
        lattice: (B, 3, 3) lattice vectors as rows.
        atom_crystal: (N,) int64 crystal index of every atom.
        n_atoms: (B,) int64 atoms per crystal.
        species_site: (S,) int64 global atom index of each species entry.
        species_z: (S,) int64 atomic number.
        species_occupancy: (S,) float occupancy (1 for ordered sites).
        entry_i: (T,) int64 global query atom of each image-table entry.
        entry_j: (T,) int64 global key atom.
        entry_n: (T, 3) integer lattice translation (stored as float for the matmul).
        labels: (B, n_targets) float64 targets, NaN where missing; None if not requested.
        ids: crystal ids, in batch order.
        cutoff: the image-table cutoff (A) all tables were built with.
        forces: (N, 3) float64 force labels (eV/A), NaN rows for crystals without forces; None if
            not requested (energy training: :func:`cfdist.shards.collate_arrow` with ``forces=True``).
        stress: (B, 3, 3) float64 stress labels (eV/A^3, ASE convention), NaN for crystals without
            one; None if not requested.
    """

    positions: torch.Tensor
    lattice: torch.Tensor
    atom_crystal: torch.Tensor
    n_atoms: torch.Tensor
    species_site: torch.Tensor
    species_z: torch.Tensor
    species_occupancy: torch.Tensor
    entry_i: torch.Tensor
    entry_j: torch.Tensor
    entry_n: torch.Tensor
    labels: torch.Tensor | None
    ids: list[str]
    cutoff: float
    forces: torch.Tensor | None = None
    stress: torch.Tensor | None = None

    @property
    def n_crystals(self) -> int:
        return int(self.n_atoms.shape[0])

    @property
    def n_entries(self) -> int:
        return int(self.entry_i.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CrystalBatch":
        """Move tensors to ``device``; floating-point geometry and labels to ``dtype``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                target_dtype = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
                value = value.to(device=device, dtype=target_dtype)
            moved[f.name] = value
        return CrystalBatch(**moved)


def collate(crystals: Sequence["Crystal"], tables: Sequence[ImageTable],
            target_names: Sequence[str] | None = None) -> CrystalBatch:
    """Concatenate ``crystals`` and their ``tables`` into one :class:`CrystalBatch`.

    Args:
        crystals: B crystal records.
        tables: B image tables, one per crystal, all built with the same cutoff.
        target_names: if given, ``labels`` is (B, len(target_names)) with NaN for
            labels a crystal lacks.
    """
    if len(crystals) != len(tables):
        raise ValueError(f"collate: {len(crystals)} crystals but {len(tables)} tables")
    if len(crystals) == 0:
        raise ValueError("collate: empty batch")
    cutoffs = {t.cutoff for t in tables}
    if len(cutoffs) != 1:
        raise ValueError(f"collate: tables were built with different cutoffs {sorted(cutoffs)}")

    n_atoms = np.array([c.n_atoms for c in crystals], dtype=np.int64)
    atom_offset = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    n_entries = np.array([len(t) for t in tables], dtype=np.int64)
    entry_offset = np.repeat(atom_offset, n_entries)

    species = [c.species() for c in crystals]
    n_species = np.array([len(s[0]) for s in species], dtype=np.int64)
    species_site = np.concatenate([s[0] for s in species]) + np.repeat(atom_offset, n_species)

    labels = None
    if target_names is not None:
        labels = torch.tensor([[float(c.labels.get(name, np.nan)) for name in target_names] for c in crystals],
                              dtype=torch.float64).reshape(len(crystals), len(target_names))

    def cat(arrays, dtype):
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays), dtype=dtype))

    return CrystalBatch(
        positions=cat([c.positions for c in crystals], np.float64),
        lattice=torch.from_numpy(np.stack([c.lattice for c in crystals]).astype(np.float64)),
        atom_crystal=torch.from_numpy(np.repeat(np.arange(len(crystals), dtype=np.int64), n_atoms)),
        n_atoms=torch.from_numpy(n_atoms),
        species_site=torch.from_numpy(species_site.astype(np.int64)),
        species_z=cat([s[1] for s in species], np.int64),
        species_occupancy=cat([s[2] for s in species], np.float64),
        entry_i=cat([t.i for t in tables], np.int64) + torch.from_numpy(entry_offset),
        entry_j=cat([t.j for t in tables], np.int64) + torch.from_numpy(entry_offset),
        entry_n=cat([t.n for t in tables], np.float64),
        labels=labels,
        ids=[c.id for c in crystals],
        cutoff=float(next(iter(cutoffs))),
    )
