"""Per-batch periodic geometry, computed once and shared by every layer and head.

From a :class:`~cfdist.batch.CrystalBatch` this derives, on the batch's device:
entry distances (recomputed from positions and integer translations, so positions
and lattice stay differentiable; docs/model.md, Image tables), each pair's smallest squared
distance, the cutoff envelope, and the Gaussian basis of every entry laid out in the
fixed-width blocks per query atom of the attention op's blocked product (docs/model.md,
Attention op). The pair grouping and the block layout themselves are index work with
data-dependent sizes, done by the CPU collate (:func:`cfdist.batch.pair_blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cfdist.batch import CrystalBatch


@dataclass
class PeriodicGraph:
    """Geometry of one batch (N atoms, T table entries, P atom pairs with entries, R blocks).

    Attributes:
        n_atoms_total: N.
        entry_i: (T,) query atom of each entry.
        entry_pair: (T,) pair index of each entry (entries are sorted by pair).
        entry_d2: (T,) squared distance |p_j + nL - p_i|^2.
        pair_i: (P,) query atom of each pair; pairs sorted by (i, j).
        pair_j: (P,) key atom of each pair.
        pair_d2_min: (P,) smallest squared distance among the pair's entries (detached:
            it only shifts the log-sum-exp and cancels exactly in the gradient).
        entry_weight: (T,) smooth cutoff envelope f(d) in [0, 1] multiplying each entry's
            within-pair weight (1 inside ``cutoff - width``, 0 from the cutoff on;
            :func:`cutoff_envelope`); None when the model has no envelope.
        basis_blocks: (R, W, K) Gaussian basis of the entries, W entries per block, each
            block holding entries of one query atom, zero padded; None when K = 0.
        entry_slot: (T,) flat position of each entry in the (R * W) block layout.
        block_atom: (R,) query atom of each block.
    """

    n_atoms_total: int
    entry_i: torch.Tensor
    entry_pair: torch.Tensor
    entry_d2: torch.Tensor
    pair_i: torch.Tensor
    pair_j: torch.Tensor
    pair_d2_min: torch.Tensor
    entry_weight: torch.Tensor | None
    basis_blocks: torch.Tensor | None
    entry_slot: torch.Tensor
    block_atom: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return self.pair_i.shape[0]

    @property
    def block_width(self) -> int:
        return 0 if self.basis_blocks is None else self.basis_blocks.shape[1]

    @classmethod
    def build(cls, batch: CrystalBatch, *, n_basis: int, gbf_r_max: float, gbf_width_scale: float,
              dtype: torch.dtype, envelope: tuple[str, float, float] | None = None) -> "PeriodicGraph":
        """Derive the graph of ``batch``; geometry in ``max(dtype, float32)`` precision.

        Only float math on tensors of sizes the batch fixes: the pairs and blocks come from the
        collate (:func:`cfdist.batch.pair_blocks`), so nothing here reads a tensor's values on the
        host or makes a shape from them.

        ``envelope``: (kind, cutoff, width) of the smooth cutoff switch (:func:`cutoff_envelope`), or None.
        """
        geo_dtype = torch.promote_types(dtype, torch.float32)
        positions = batch.positions.to(geo_dtype)
        lattice = batch.lattice.to(geo_dtype)
        i, j = batch.entry_i, batch.entry_j
        n_atoms_total = positions.shape[0]
        crystal = batch.atom_crystal[i]
        # p_j + n L - p_i, per entry with its own crystal's lattice.
        shift = torch.bmm(batch.entry_n.to(geo_dtype).unsqueeze(1), lattice[crystal]).squeeze(1)
        vec = positions[j] + shift - positions[i]
        d2 = (vec * vec).sum(-1)

        entry_pair = batch.entry_pair
        n_pairs = batch.pair_i.shape[0]
        pair_d2_min = torch.full((n_pairs,), float("inf"), dtype=geo_dtype, device=d2.device)
        pair_d2_min = pair_d2_min.scatter_reduce(0, entry_pair, d2.detach(), reduce="amin")

        # clamp keeps the gradient finite (zero) at the self image, where d = 0
        distance = torch.sqrt(d2.clamp_min(1e-30))
        entry_weight = None if envelope is None else cutoff_envelope(distance, *envelope)
        basis_blocks = None
        if n_basis > 0:
            width, n_blocks = batch.block_width, batch.block_atom.shape[0]
            basis = gaussian_basis(distance, n_basis, gbf_r_max, gbf_width_scale).to(dtype)
            basis_blocks = basis.new_zeros(n_blocks * width, n_basis).index_copy(0, batch.entry_slot, basis)
            basis_blocks = basis_blocks.view(n_blocks, width, n_basis)
        return cls(n_atoms_total=n_atoms_total, entry_i=i, entry_pair=entry_pair, entry_d2=d2,
                   pair_i=batch.pair_i, pair_j=batch.pair_j, pair_d2_min=pair_d2_min, entry_weight=entry_weight,
                   basis_blocks=basis_blocks, entry_slot=batch.entry_slot, block_atom=batch.block_atom)


def cutoff_envelope(distance: torch.Tensor, kind: str, cutoff: float, width: float) -> torch.Tensor:
    """Smooth switch f(d): 1 for d <= cutoff - width, 0 for d >= cutoff, a polynomial of
    x = (d - cutoff + width) / width in [0, 1] between.

    Multiplying every image's weight exp(a d^2) by f makes the attention, and so an energy
    model's energy and forces, continuous when an atom or image crosses the cutoff.

    Kinds:
        ``"polynomial"``: f = 1 - 28 x^6 + 48 x^7 - 21 x^8 (DimeNet's envelope, p = 6, on the
            shell): f' = -168 x^5 (1 - x)^2, so f, f' and f'' vanish at the cutoff (forces have a
            continuous derivative: finite-displacement phonons, MD) and f', ..., f^(5) at the inner edge.
        ``"cubic"``: f = 1 - 3x^2 + 2x^3: f and f' continuous (cfdist 0.1.0's envelope).

    Args:
        distance: (T,) distances (A).
    Returns:
        (T,) weights in [0, 1], in the dtype of ``distance``.
    """
    x = ((distance - (cutoff - width)) / width).clamp(0.0, 1.0)
    if kind == "polynomial":
        # the same polynomial as (1 - x)^3 (1 + 3x + 6x^2 + 10x^3 + 15x^4 + 21x^5): the triple root
        # at the cutoff explicit, all terms positive, no cancellation near x = 1 in float32
        u = 1.0 - x
        return u * u * u * (1.0 + x * (3.0 + x * (6.0 + x * (10.0 + x * (15.0 + 21.0 * x)))))
    if kind == "cubic":
        return 1.0 - x * x * (3.0 - 2.0 * x)
    raise ValueError(f"cutoff_envelope: unknown kind {kind!r} (polynomial or cubic)")


def gaussian_basis(distance: torch.Tensor, n_basis: int, r_max: float, width_scale: float) -> torch.Tensor:
    """Gaussian basis b_k(r) = exp(-(r - mu_k)^2 / 2w^2), mu_k = k r_max / K (k = 1..K).

    Only the centres within 8.6 widths of r are evaluated (the others are below 1e-16, i.e.
    zero at float64 resolution relative to the peak of 1), which saves ~3x of the work for
    the default K = 64, w = r_max / K.

    Args:
        distance: (T,) distances (A).
    Returns:
        (T, K) basis values; w = width_scale * r_max / K.
    """
    spacing = r_max / n_basis
    width = width_scale * spacing
    half = math.ceil(_TAIL_WIDTHS * width_scale)
    if 2 * half + 1 >= n_basis:
        centres = torch.arange(1, n_basis + 1, dtype=distance.dtype, device=distance.device) * spacing
        return torch.exp(-0.5 * ((distance[:, None] - centres[None, :]) / width) ** 2)
    offsets = torch.arange(-half, half + 1, device=distance.device)
    nearest = torch.round(distance.detach() / spacing).long() - 1  # index k - 1 of the closest centre
    index = nearest[:, None] + offsets[None, :]  # (T, window)
    inside = (index >= 0) & (index < n_basis)
    centres = (index + 1).to(distance.dtype) * spacing
    values = torch.exp(-0.5 * ((distance[:, None] - centres) / width) ** 2) * inside
    # scatter_add: clamped out-of-range slots add exact zeros instead of overwriting a value.
    out = distance.new_zeros(distance.shape[0], n_basis)
    return out.scatter_add(1, index.clamp(0, n_basis - 1), values)


_TAIL_WIDTHS = 8.6  # exp(-8.6^2 / 2) = 8e-17
