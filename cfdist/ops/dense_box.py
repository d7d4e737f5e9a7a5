"""Dense-box periodic attention: the reference implementation's PyTorch fallback.

Every ordered pair of atoms of a crystal (E = sum_b N_b^2) against every translation
of a fixed box n in [-R, R]^3 ((2R + 1)^3 images), with the (E, images, K) Gaussian
basis tensor materialised once per layer and the heads looped, as the reference's
``IndexedLatticeformerEncoder`` does (R = ``lattice_range`` = 2 there).

It exists as the baseline of ``bench/attention.py``: the same model math over the box the
reference truncates to, to measure what the sphere-cutoff image tables save. It is not a
checkpoint-compatibility layer (the box rule is only approximately cell-invariant). Its time
and memory grow as N^2 (2R+1)^3 K. :class:`DenseBoxAttention` plugs it into
:class:`cfdist.Crystalformer` as an attention backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cfdist.batch import CrystalBatch
from cfdist.graph import gaussian_basis

if TYPE_CHECKING:
    from cfdist.config import CrystalformerConfig


@dataclass
class DenseBoxGeometry:
    """All-pairs x box geometry of a batch.

    Attributes:
        pair_i, pair_j: (E,) every ordered atom pair of each crystal, i-major.
        d2: (E, M) squared distance of each pair's image under each of the M box translations.
        basis: (E, M, K) Gaussian basis of every (pair, image), or None when K = 0.
    """

    pair_i: torch.Tensor
    pair_j: torch.Tensor
    d2: torch.Tensor
    basis: torch.Tensor | None

    @classmethod
    def build(cls, batch: CrystalBatch, box_range: int, n_basis: int, gbf_r_max: float,
              gbf_width_scale: float, dtype: torch.dtype) -> "DenseBoxGeometry":
        geo_dtype = torch.promote_types(dtype, torch.float32)
        positions = batch.positions.to(geo_dtype)
        lattice = batch.lattice.to(geo_dtype)
        counts = batch.n_atoms
        first = torch.cumsum(counts, 0) - counts
        # Pairs of crystal b: first_b + (a // N_b, a % N_b) for a < N_b^2.
        pairs_per = counts * counts
        device = counts.device  # index tensors on the batch's device (CUDA runs too)
        crystal = torch.repeat_interleave(torch.arange(len(counts), device=device), pairs_per)
        local = torch.arange(int(pairs_per.sum()), device=device) - torch.repeat_interleave(torch.cumsum(pairs_per, 0) - pairs_per,
                                                                              pairs_per)
        pair_i = first[crystal] + local // counts[crystal]
        pair_j = first[crystal] + local % counts[crystal]
        axis = torch.arange(-box_range, box_range + 1, dtype=geo_dtype, device=positions.device)
        box = torch.cartesian_prod(axis, axis, axis)  # (M, 3)
        translations = box @ lattice  # (B, M, 3)
        vec = (positions[pair_j] - positions[pair_i])[:, None, :] + translations[crystal]  # (E, M, 3)
        d2 = (vec * vec).sum(-1)
        basis = None
        if n_basis > 0:
            d = torch.sqrt(d2.clamp_min(1e-30))
            basis = gaussian_basis(d.reshape(-1), n_basis, gbf_r_max, gbf_width_scale).reshape(*d.shape, n_basis)
            basis = basis.to(dtype)
        return cls(pair_i=pair_i, pair_j=pair_j, d2=d2, basis=basis)


def dense_box_attention(q, k, v, a, geometry: DenseBoxGeometry, edge_proj=None) -> torch.Tensor:
    """Same math as :func:`cfdist.ops.periodic_attention`, summed over the dense box.

    Args:
        q, k, v: (N, H, d_h); a: (N, H); edge_proj: (H, d_h, K) or None.
    Returns:
        (N, H, d_h).
    """
    n_atoms, n_heads, head_dim = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    pi, pj = geometry.pair_i, geometry.pair_j
    alphas, betas = [], []
    for h in range(n_heads):  # the reference loops heads to avoid an (E, H, M, K) tensor
        phi = a[pi, h].to(acc)[:, None] * geometry.d2  # (E, M)
        alphas.append(torch.logsumexp(phi, dim=1))
        if edge_proj is not None:
            mean_basis = torch.einsum("em,emk->ek", torch.softmax(phi, dim=1).to(geometry.basis.dtype),
                                      geometry.basis)
            betas.append(mean_basis @ edge_proj[h].T)  # (E, d_h)
    alpha = torch.stack(alphas, dim=1)  # (E, H)
    logits = (q[pi].to(acc) * k[pj].to(acc)).sum(-1) / math.sqrt(head_dim) + alpha
    row_max = logits.new_full((n_atoms, n_heads), -math.inf)
    row_max = row_max.scatter_reduce(0, pi[:, None].expand(-1, n_heads), logits.detach(), reduce="amax")
    weight = torch.exp(logits - row_max[pi])
    p = weight / weight.new_zeros(n_atoms, n_heads).index_add_(0, pi, weight)[pi]
    values = v[pj].to(acc)
    if edge_proj is not None:
        values = values + torch.stack(betas, dim=1).to(acc)
    out = values.new_zeros(n_atoms, n_heads, head_dim).index_add_(0, pi, p[:, :, None] * values)
    return out.to(v.dtype)


class DenseBoxAttention:
    """Model attention backend over the dense (2R+1)^3 box (the reference's PyTorch fallback)."""

    def __init__(self, box_range: int = 2):
        self.box_range = int(box_range)

    def prepare(self, batch: CrystalBatch, config: CrystalformerConfig, dtype: torch.dtype) -> DenseBoxGeometry:
        return DenseBoxGeometry.build(batch, self.box_range, config.n_basis, config.gbf_r_max,
                                      config.gbf_width_scale, dtype)

    def __call__(self, q, k, v, a, geometry, edge_proj):
        return dense_box_attention(q, k, v, a, geometry, edge_proj)
