"""Plain, readable implementations of the periodic attention, for tests (use float64).

* :func:`reference_periodic_attention` spells out the pseudo-finite form of the paper:
  per pair alpha = logsumexp over images, beta = W^E (softmax-weighted basis), then an
  ordinary softmax over key atoms. Loops over atoms and pairs; small inputs only.
* :func:`unrolled_attention` is the "infinite" form taken literally: one softmax over
  every (key atom, image) entry with logits q.k/sqrt(d_h) + a d^2 and values
  v_j + W^E b(d). The two are equal in exact arithmetic (the pseudo-finite identity).
"""

from __future__ import annotations

import math

import torch


def reference_periodic_attention(q, k, v, a, entry_i, entry_j, entry_distance, entry_basis=None,
                                 edge_proj=None, entry_weight=None) -> torch.Tensor:
    """Pseudo-finite attention, written for readability.

    Args:
        q, k, v: (N, H, d_h).
        a: (N, H) exponent coefficients -1 / (2 sigma^2).
        entry_i, entry_j: (T,) atoms of each image-table entry.
        entry_distance: (T,) image distances |p_j + nL - p_i|.
        entry_basis: (T, K) Gaussian basis of each entry (needed with ``edge_proj``).
        edge_proj: (H, d_h, K) per-head W^E, or None for no beta term.
        entry_weight: (T,) cutoff envelope f_t multiplying each image's weight, or None (all 1).
    Returns:
        (N, H, d_h).
    """
    n_atoms, n_heads, head_dim = q.shape
    log_weight = None if entry_weight is None else torch.log(entry_weight)
    outputs = []
    for i in range(n_atoms):
        logits, values = [], []
        mine = entry_i == i
        for j in torch.unique(entry_j[mine]).tolist():
            sel = mine & (entry_j == j)
            phi = a[i][:, None] * entry_distance[sel][None, :] ** 2  # (H, images)
            if log_weight is not None:
                phi = phi + log_weight[sel][None, :]
            alpha = torch.logsumexp(phi, dim=1)  # (H,)
            value = v[j]
            if edge_proj is not None:
                mean_basis = torch.softmax(phi, dim=1) @ entry_basis[sel]  # (H, K) = b-bar
                value = value + torch.einsum("hk,hdk->hd", mean_basis, edge_proj)  # + beta
            logits.append((q[i] * k[j]).sum(-1) / math.sqrt(head_dim) + alpha)
            values.append(value)
        p = torch.softmax(torch.stack(logits), dim=0)  # (J, H)
        outputs.append((p[:, :, None] * torch.stack(values)).sum(0))
    return torch.stack(outputs)


def unrolled_attention(q, k, v, a, entry_i, entry_j, entry_distance, entry_basis=None,
                       edge_proj=None) -> torch.Tensor:
    """Explicit attention over every (j, image) entry; same arguments as the reference."""
    n_atoms, n_heads, head_dim = q.shape
    outputs = []
    for i in range(n_atoms):
        sel = entry_i == i
        js, d = entry_j[sel], entry_distance[sel]
        logits = (q[i][None] * k[js]).sum(-1) / math.sqrt(head_dim) + a[i][None, :] * d[:, None] ** 2  # (t, H)
        values = v[js]  # (t, H, d_h)
        if edge_proj is not None:
            values = values + torch.einsum("tk,hdk->thd", entry_basis[sel], edge_proj)
        p = torch.softmax(logits, dim=0)
        outputs.append((p[:, :, None] * values).sum(0))
    return torch.stack(outputs)
