"""The efficient periodic-attention op used for training (docs/model.md, Attention op).

For query atom i, head h, key atom j and table entries t of the pair (i, j):

    alpha_ijh = log sum_t f_t exp(a_ih d_t^2)                  (periodic spatial encoding)
    w_th      = f_t exp(a_ih d_t^2 - alpha_ijh)                (within-pair weights)
    p_ijh     = softmax_j(q_ih . k_jh / sqrt(d_h) + alpha_ijh)
    y_ih      = sum_j p_ijh v_jh + W^E_h sum_{t of i} (p_{i j(t) h} w_th) B_t

The value term folds the edge encoding beta into the attention, so no tensor of size
T x H x K (or N^2 x box x K) is ever formed: the last sum is one (H x W)(W x K) product
per block of W entries of a query atom, followed by a (K -> d_h) projection per atom.
Peak extra memory is O(T H + P H d_h + R H K) with R ~ T / W blocks.

f_t is the smooth cutoff envelope of energy models (``graph.entry_weight``; 1 without one).
Exponents, log-sum-exp and softmax run in at least float32.
"""

from __future__ import annotations

import math

import torch

from cfdist.graph import PeriodicGraph


def periodic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                       graph: PeriodicGraph, edge_proj: torch.Tensor | None) -> torch.Tensor:
    """Infinitely connected attention over the image table of ``graph``.

    Args:
        q, k, v: (N, H, d_h) projected queries, keys and values.
        a: (N, H) exponent coefficients a_ih = -1 / (2 sigma_ih^2) (negative).
        graph: the batch's :class:`PeriodicGraph`.
        edge_proj: (H, d_h, K) per-head W^E, or None for the simplified model (no beta).

    Returns:
        (N, H, d_h) attention output per head, in the dtype of ``v``.
    """
    out_dtype = v.dtype
    acc = torch.promote_types(q.dtype, torch.float32)
    n_atoms, n_heads, head_dim = q.shape
    a = a.to(acc)
    pair_i, pair_j, entry_pair = graph.pair_i, graph.pair_j, graph.entry_pair

    # Within-pair weights, shifted by each pair's nearest image so every exponent is <= 0.
    rel_d2 = (graph.entry_d2 - graph.pair_d2_min[entry_pair]).to(acc)
    unnorm = torch.exp(a[graph.entry_i] * rel_d2[:, None])  # (T, H)
    if graph.entry_weight is not None:
        unnorm = unnorm * graph.entry_weight.to(acc)[:, None]
    pair_sum = unnorm.new_zeros(graph.n_pairs, n_heads).index_add_(0, entry_pair, unnorm)  # (P, H)
    if graph.entry_weight is not None:
        # a pair whose images all lie at or beyond the cutoff has weight 0 (its p underflows to 0)
        pair_sum = pair_sum.clamp_min(torch.finfo(acc).tiny)
    alpha = a[pair_i] * graph.pair_d2_min.to(acc)[:, None] + torch.log(pair_sum)  # (P, H)

    # Softmax over the key atoms j of each query atom i (pairs are sorted by i).
    logits = (q[pair_i].to(acc) * k[pair_j].to(acc)).sum(-1) / math.sqrt(head_dim) + alpha
    row_max = logits.new_full((n_atoms, n_heads), -math.inf)
    row_max = row_max.scatter_reduce(0, pair_i[:, None].expand(-1, n_heads), logits.detach(), reduce="amax")
    weight = torch.exp(logits - row_max[pair_i])
    row_sum = weight.new_zeros(n_atoms, n_heads).index_add_(0, pair_i, weight)
    p = weight / row_sum[pair_i]  # (P, H)

    out = q.new_zeros(n_atoms, n_heads, head_dim, dtype=acc)
    out = out.index_add_(0, pair_i, p[:, :, None] * v[pair_j].to(acc))

    if edge_proj is not None:
        # c_th = p_{ij(t)h} w_th, scattered into blocks of W entries per query atom.
        coeff = (p / pair_sum)[entry_pair] * unnorm  # (T, H)
        blocks = graph.basis_blocks
        n_blocks, width, n_basis = blocks.shape
        coeff_blocks = coeff.new_zeros(n_blocks * width, n_heads).index_copy(0, graph.entry_slot, coeff)
        coeff_blocks = coeff_blocks.view(n_blocks, width, n_heads).transpose(1, 2).to(blocks.dtype)
        per_block = torch.bmm(coeff_blocks, blocks)  # (R, H, K)
        basis_mix = per_block.new_zeros(n_atoms, n_heads, n_basis).index_add_(0, graph.block_atom, per_block)
        out = out + torch.einsum("nhk,hdk->nhd", basis_mix, edge_proj.to(basis_mix.dtype)).to(acc)
    return out.to(out_dtype)
