"""Batching: concatenate crystals and their image tables into one flat batch.

All per-atom and per-entry arrays are concatenated with global indices (atom index
offsets added to the tables) in a handful of vectorised numpy calls; the only Python
loop runs over structures, never over atoms, pairs or table entries.

The batch also carries the index work whose sizes depend on the data (the table's atom pairs
and the blocks of entries per atom, :func:`pair_blocks`): done here on the CPU, it leaves the
model's forward and backward without any op whose output shape depends on tensor values, so a
device never waits for the host inside a step and a compiled step is one graph.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
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
        entry_pair: (T,) int64 atom pair (i, j) of each entry; P pairs, numbered in (i, j) order.
        pair_i: (P,) int64 query atom of each pair.
        pair_j: (P,) int64 key atom of each pair.
        entry_slot: (T,) int64 position of each entry in the (R * W) block layout: R blocks of W =
            ``block_width`` entries, each holding entries of one query atom (zero padded).
        block_atom: (R,) int64 query atom of each block.
        block_width: W, entries per block (the run's ``compute.entry_chunk``).
        labels: (B, n_targets) float64 targets, NaN where missing; None if not requested.
        ids: crystal ids, in batch order.
        cutoff: the image-table cutoff (A) all tables were built with.
        forces: (N, 3) float64 force labels (eV/A), NaN rows for crystals without forces; None if
            not requested (energy training: :func:`cfdist.shards.collate_arrow` with ``forces=True``).
        stress: (B, 3, 3) float64 stress labels (eV/A^3, ASE convention), NaN for crystals without
            one; None if not requested.
        dataset: the dataset of a mixture this batch was drawn from (its head and loss); None
            outside mixtures.
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
    entry_pair: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    entry_slot: torch.Tensor
    block_atom: torch.Tensor
    block_width: int
    labels: torch.Tensor | None
    ids: list[str]
    cutoff: float
    forces: torch.Tensor | None = None
    stress: torch.Tensor | None = None
    dataset: str | None = None

    @property
    def n_crystals(self) -> int:
        return int(self.n_atoms.shape[0])

    @property
    def n_entries(self) -> int:
        return int(self.entry_i.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "CrystalBatch":
        """Move tensors to ``device``; floating-point geometry and labels to ``dtype``.

        To a CUDA device the host tensors go through pinned memory with non-blocking copies: the
        copies queue on the current stream and the host goes on (kernels that read them follow
        on the same stream, so they see the data).
        """
        to_cuda = device is not None and torch.device(device).type == "cuda"
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                target_dtype = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
                if to_cuda and value.device.type == "cpu":
                    value = value if value.is_pinned() else value.pin_memory()
                    value = value.to(device=device, dtype=target_dtype, non_blocking=True)
                else:
                    value = value.to(device=device, dtype=target_dtype)
            moved[f.name] = value
        return CrystalBatch(**moved)

    def with_block_width(self, block_width: int) -> "CrystalBatch":
        """This batch with its entries laid out in blocks of ``block_width`` (computed on the host)."""
        layout = block_layout(self.entry_i.cpu().numpy(), int(self.positions.shape[0]), block_width)
        device = self.entry_i.device
        return replace(self, block_width=int(block_width),
                       **{name: torch.from_numpy(value).to(device) for name, value in layout.items()})


# the default of compute.entry_chunk (cfdist.run.config.ComputeSection), for batches made outside a run
# (predict, the calculator, tests); a constant here keeps the batch free of config imports
DEFAULT_BLOCK_WIDTH = 32


def pair_blocks(entry_i: np.ndarray, entry_j: np.ndarray, n_atoms_total: int, block_width: int) -> dict[str, np.ndarray]:
    """Index arrays of a batch's image table (T entries sorted by (i, j), global atom indices).

    Returns int64 arrays ``entry_pair`` (T,), ``pair_i`` (P,), ``pair_j`` (P,) (pairs: runs of
    equal (i, j)) and, from :func:`block_layout`, ``entry_slot`` (T,) and ``block_atom`` (R,).
    """
    entry_i = np.asarray(entry_i, dtype=np.int64)
    entry_j = np.asarray(entry_j, dtype=np.int64)
    starts = np.ones(len(entry_i), dtype=bool)
    starts[1:] = (entry_i[1:] != entry_i[:-1]) | (entry_j[1:] != entry_j[:-1])
    return {"entry_pair": np.cumsum(starts, dtype=np.int64) - 1,
            "pair_i": entry_i[starts], "pair_j": entry_j[starts],
            **block_layout(entry_i, n_atoms_total, block_width)}


def block_layout(entry_i: np.ndarray, n_atoms_total: int, block_width: int) -> dict[str, np.ndarray]:
    """Blocks of ``block_width`` entries per query atom (an atom's entries are contiguous).

    Returns int64 ``entry_slot`` (T,): each entry's flat position in the (R * W) layout, and
    ``block_atom`` (R,): the query atom of each block (ceil(entries / W) blocks per atom).
    """
    if int(block_width) < 1:
        raise ValueError(f"block_width must be >= 1, got {block_width}")
    width = int(block_width)
    entry_i = np.asarray(entry_i, dtype=np.int64)
    per_atom = np.bincount(entry_i, minlength=n_atoms_total).astype(np.int64)
    blocks_per_atom = (per_atom + width - 1) // width
    first_entry = np.cumsum(per_atom) - per_atom
    first_block = np.cumsum(blocks_per_atom) - blocks_per_atom
    rank = np.arange(len(entry_i), dtype=np.int64) - first_entry[entry_i]
    return {"entry_slot": (first_block[entry_i] + rank // width) * width + rank % width,
            "block_atom": np.repeat(np.arange(n_atoms_total, dtype=np.int64), blocks_per_atom)}


def index_tensors(entry_i: np.ndarray, entry_j: np.ndarray, n_atoms_total: int,
                  block_width: int) -> dict[str, torch.Tensor]:
    """:func:`pair_blocks` as tensors, the keyword arguments a :class:`CrystalBatch` takes for them."""
    arrays = pair_blocks(entry_i, entry_j, n_atoms_total, block_width)
    return {"block_width": int(block_width), **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}}


def collate(crystals: Sequence["Crystal"], tables: Sequence[ImageTable],
            target_names: Sequence[str] | None = None, block_width: int = DEFAULT_BLOCK_WIDTH) -> CrystalBatch:
    """Concatenate ``crystals`` and their ``tables`` into one :class:`CrystalBatch`.

    Args:
        crystals: B crystal records.
        tables: B image tables, one per crystal, all built with the same cutoff.
        target_names: if given, ``labels`` is (B, len(target_names)) with NaN for
            labels a crystal lacks.
        block_width: entries per block of the attention op's basis layout (``compute.entry_chunk``).
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

    entry_i = np.concatenate([t.i for t in tables]).astype(np.int64) + entry_offset
    entry_j = np.concatenate([t.j for t in tables]).astype(np.int64) + entry_offset
    return CrystalBatch(
        positions=cat([c.positions for c in crystals], np.float64),
        lattice=torch.from_numpy(np.stack([c.lattice for c in crystals]).astype(np.float64)),
        atom_crystal=torch.from_numpy(np.repeat(np.arange(len(crystals), dtype=np.int64), n_atoms)),
        n_atoms=torch.from_numpy(n_atoms),
        species_site=torch.from_numpy(species_site.astype(np.int64)),
        species_z=cat([s[1] for s in species], np.int64),
        species_occupancy=cat([s[2] for s in species], np.float64),
        entry_i=torch.from_numpy(entry_i),
        entry_j=torch.from_numpy(entry_j),
        entry_n=cat([t.n for t in tables], np.float64),
        **index_tensors(entry_i, entry_j, int(n_atoms.sum()), block_width),
        labels=labels,
        ids=[c.id for c in crystals],
        cutoff=float(next(iter(cutoffs))),
    )
