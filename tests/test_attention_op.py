"""The periodic-attention op: efficient vs float64 reference vs unrolled attention, gradients, memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cfdist.batch import collate
from cfdist.crystal import Crystal
from cfdist.graph import PeriodicGraph, gaussian_basis
from cfdist.geometry import image_table
from cfdist.ops import periodic_attention, reference_periodic_attention, unrolled_attention
from cfdist.ops.dense_box import DenseBoxGeometry, dense_box_attention
from cfdist.testing import random_crystal

K = 16
R_MAX = 14.0


def make_batch(crystals, cutoff):
    return collate(crystals, [image_table(c.lattice, c.positions, cutoff) for c in crystals])


def entry_geometry(batch):
    """Entry distances and basis computed independently of PeriodicGraph (float64)."""
    lattice = batch.lattice[batch.atom_crystal[batch.entry_i]]
    vec = batch.positions[batch.entry_j] + torch.einsum("tx,txy->ty", batch.entry_n, lattice) \
        - batch.positions[batch.entry_i]
    d = vec.norm(dim=-1)
    return d, gaussian_basis(d, K, R_MAX, 1.0)


def random_inputs(n_atoms, heads=4, head_dim=5, dtype=torch.float64, seed=0, sigma=(0.3, 1.98)):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n_atoms, heads, head_dim, generator=gen, dtype=dtype) for _ in range(3))
    s = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(n_atoms, heads, generator=gen, dtype=dtype)
    a = -1.0 / (2 * s * s)
    w = torch.randn(heads, head_dim, K, generator=gen, dtype=dtype) * 0.3
    return [t.requires_grad_() for t in (q, k, v, a, w)]


def build_graph(batch, dtype=torch.float64, width=8):
    return PeriodicGraph.build(batch.with_block_width(width), n_basis=K, gbf_r_max=R_MAX, gbf_width_scale=1.0,
                               dtype=dtype)


@pytest.fixture()
def small_batch():
    rng = np.random.default_rng(5)
    crystals = [random_crystal(rng, n, volume_per_atom=12.0, id=f"c{n}") for n in (1, 2, 4)]
    return crystals


def test_pseudo_finite_identity_against_unrolled_attention(small_batch):
    """alpha/beta attention == explicit softmax over every (j, image) in a large radius."""
    batch = make_batch(small_batch, cutoff=24.0)
    q, k, v, a, w = random_inputs(batch.positions.shape[0])
    d, basis = entry_geometry(batch)
    unrolled = unrolled_attention(q, k, v, a, batch.entry_i, batch.entry_j, d, basis, w)
    efficient = periodic_attention(q, k, v, a, build_graph(batch), w)
    reference = reference_periodic_attention(q, k, v, a, batch.entry_i, batch.entry_j, d, basis, w)
    assert (efficient - unrolled).abs().max() < 1e-10
    assert (reference - unrolled).abs().max() < 1e-10


@pytest.mark.parametrize("with_beta", [True, False])
@pytest.mark.parametrize("width", [1, 7, 32])
def test_efficient_matches_reference_float32_values_and_gradients(small_batch, with_beta, width):
    batch = make_batch(small_batch, cutoff=8.9)
    inputs64 = random_inputs(batch.positions.shape[0], seed=1)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    q, k, v, a, w = inputs32
    out = periodic_attention(q, k, v, a, build_graph(batch.to(dtype=torch.float32), torch.float32, width),
                             w if with_beta else None)
    d, basis = entry_geometry(batch)
    q64, k64, v64, a64, w64 = inputs64
    ref = reference_periodic_attention(q64, k64, v64, a64, batch.entry_i, batch.entry_j, d, basis,
                                       w64 if with_beta else None)
    assert out.dtype == torch.float32
    scale = ref.abs().max().item()
    assert (out.double() - ref).abs().max().item() < 1e-5 * scale
    upstream = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = [0, 1, 2, 3] + ([4] if with_beta else [])
    grads32 = torch.autograd.grad(out, [inputs32[p] for p in params], upstream.float())
    grads64 = torch.autograd.grad(ref, [inputs64[p] for p in params], upstream)
    for g32, g64 in zip(grads32, grads64):
        assert (g32.double() - g64).abs().max().item() < 1e-5 * max(g64.abs().max().item(), 1e-3)


def test_gradcheck_float64_including_positions_and_lattice():
    rng = np.random.default_rng(9)
    crystals = [random_crystal(rng, 2, volume_per_atom=20.0, id="a"), random_crystal(rng, 1, volume_per_atom=20.0)]
    batch = make_batch(crystals, cutoff=6.0)
    q, k, v, a, w = random_inputs(batch.positions.shape[0], heads=2, head_dim=3, seed=4)
    positions = batch.positions.clone().requires_grad_()
    lattice = batch.lattice.clone().requires_grad_()

    def fn(q, k, v, a, w, positions, lattice):
        batch.positions, batch.lattice = positions, lattice
        return periodic_attention(q, k, v, a, build_graph(batch), w)

    assert torch.autograd.gradcheck(fn, (q, k, v, a, w, positions, lattice), eps=1e-6, atol=1e-7)


def test_pairs_without_images_and_single_atom_softmax_sanity():
    # Two atoms 12 A apart in a 30 A box: at r_c = 8 A the (0, 1) pair has no entry (alpha = -inf).
    lattice = 30.0 * np.eye(3)
    crystal = Crystal(id="far", numbers=np.array([6, 8]), lattice=lattice,
                      positions=np.array([[0.0, 0.0, 0.0], [12.0, 0.0, 0.0]]))
    batch = make_batch([crystal], cutoff=8.0)
    assert set(zip(batch.entry_i.tolist(), batch.entry_j.tolist())) == {(0, 0), (1, 1)}
    q, k, v, a, w = random_inputs(2)
    out = periodic_attention(q, k, v, a, build_graph(batch), w)
    assert torch.isfinite(out).all()
    # Each atom only attends to itself: output = v_i + beta_ii, with beta from the self image (d = 0).
    beta_self = torch.einsum("k,hdk->hd", gaussian_basis(torch.zeros(1, dtype=torch.float64), K, R_MAX, 1.0)[0], w)
    assert torch.allclose(out, v + beta_self[None], atol=1e-12)


def test_zero_query_key_gives_softmax_of_alpha():
    """With q = k = 0 and no beta, p_ij is proportional to exp(alpha_ij) and rows sum to one."""
    rng = np.random.default_rng(2)
    batch = make_batch([random_crystal(rng, 3)], cutoff=8.9)
    n = batch.positions.shape[0]
    q = torch.zeros(n, 1, 4, dtype=torch.float64)
    a = torch.full((n, 1), -0.2, dtype=torch.float64)
    v = torch.nn.functional.pad(torch.eye(n, dtype=torch.float64), (0, 4 - n))[:, None, :]  # one-hot: reads out p
    p = periodic_attention(q, q, v, a, build_graph(batch), None)[:, 0, :n]  # p[i, j]
    d, _ = entry_geometry(batch)
    expected = torch.zeros(n, n, dtype=torch.float64)
    expected.index_put_((batch.entry_i, batch.entry_j), torch.exp(-0.2 * d**2), accumulate=True)
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(p, expected, atol=1e-13)
    assert torch.allclose(p.sum(1), torch.ones(n, dtype=torch.float64))
    assert (expected.diagonal() > 0).all()  # alpha_ii >= 0 thanks to the self image


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_entry_by_head_by_basis_tensor_forward_or_backward(megnet_crystals):
    crystals = megnet_crystals[:24]
    batch = make_batch(crystals, cutoff=8.9).to(dtype=torch.float32)
    heads, head_dim = 8, 16
    graph = PeriodicGraph.build(batch, n_basis=64, gbf_r_max=R_MAX, gbf_width_scale=1.0, dtype=torch.float32)
    n = batch.positions.shape[0]
    q, k, v = (torch.randn(n, heads, head_dim, requires_grad=True) for _ in range(3))
    a = (-torch.rand(n, heads) * 0.5 - 0.1).requires_grad_()
    w = torch.randn(heads, head_dim, 64, requires_grad=True)
    n_entries = batch.n_entries
    with MaxNumel() as mode:
        out = periodic_attention(q, k, v, a, graph, w)
        out.square().sum().backward()
    # Largest tensors are the (blocks x W x K) basis layout and (T x H) weights: a small fraction of T*H*K.
    assert mode.largest < 0.25 * n_entries * heads * 64, (mode.largest, n_entries)
    assert graph.basis_blocks.numel() < 1.5 * n_entries * 64


def test_dense_box_baseline_converges_to_the_same_attention():
    """With a box covering the whole sphere, the reference's dense-box form equals the table op."""
    rng = np.random.default_rng(4)
    crystals = [random_crystal(rng, 2, volume_per_atom=60.0, skew=0.1, id="x"),
                random_crystal(rng, 3, volume_per_atom=60.0, skew=0.1, id="y")]
    batch = make_batch(crystals, cutoff=30.0)
    q, k, v, a, w = random_inputs(batch.positions.shape[0], sigma=(0.3, 1.2))
    table = periodic_attention(q, k, v, a, build_graph(batch), w)
    box = DenseBoxGeometry.build(batch, box_range=7, n_basis=K, gbf_r_max=R_MAX, gbf_width_scale=1.0,
                                 dtype=torch.float64)
    dense = dense_box_attention(q, k, v, a, box, w)
    assert (table - dense).abs().max() < 1e-9


@pytest.mark.parametrize("n_basis,width_scale", [(64, 1.0), (16, 1.0), (64, 2.5), (8, 1.0)])
def test_windowed_gaussian_basis_equals_the_dense_formula(n_basis, width_scale):
    """The windowed basis (only centres near r) equals exp(-(r - mu_k)^2 / 2w^2) over all k."""
    r_max = 14.0
    d = torch.cat([torch.linspace(0, 20, 4001, dtype=torch.float64),
                   torch.tensor([0.0, r_max, r_max / n_basis, 1e-9], dtype=torch.float64)]).requires_grad_()
    spacing = r_max / n_basis
    centres = torch.arange(1, n_basis + 1, dtype=torch.float64) * spacing
    dense = torch.exp(-0.5 * ((d[:, None] - centres) / (width_scale * spacing)) ** 2)
    got = gaussian_basis(d, n_basis, r_max, width_scale)
    assert got.shape == (d.shape[0], n_basis)
    assert (got - dense).abs().max().item() < 1e-15
    weights = torch.randn(n_basis, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g_got, = torch.autograd.grad((got * weights).sum(), d)
    g_dense, = torch.autograd.grad((dense * weights).sum(), d)
    torch.testing.assert_close(g_got, g_dense, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- index work in the collate
def test_collate_pair_and_block_indices_equal_a_plain_loop(megnet_crystals):
    """cfdist.batch.pair_blocks (numpy, in the collate) against the definition, loop by loop: pairs
    are runs of equal (i, j) in table order; each atom's entries fill ceil(T_i / W) blocks of W
    slots in order; for several widths, and after with_block_width."""
    crystals = megnet_crystals[:5]
    for width in (1, 5, 32):
        batch = collate(crystals, [image_table(c.lattice, c.positions, 8.9) for c in crystals], block_width=width)
        i, j = batch.entry_i.tolist(), batch.entry_j.tolist()
        pairs, entry_pair = [], []
        for a, b in zip(i, j):
            if not pairs or pairs[-1] != (a, b):
                pairs.append((a, b))
            entry_pair.append(len(pairs) - 1)
        assert batch.entry_pair.tolist() == entry_pair
        assert list(zip(batch.pair_i.tolist(), batch.pair_j.tolist())) == pairs
        slots, block_atom, seen = [], [], {}
        for a in i:
            rank = seen.get(a, 0)
            if rank % width == 0:
                block_atom.append(a)
            slots.append((len(block_atom) - 1) * width + rank % width)
            seen[a] = rank + 1
        n_atoms = batch.positions.shape[0]
        # atoms without entries (none here: every atom sees itself) would own no block
        assert batch.entry_slot.tolist() == slots and batch.block_atom.tolist() == block_atom
        assert batch.block_width == width and sorted(seen) == list(range(n_atoms))
        again = collate(crystals, [image_table(c.lattice, c.positions, 8.9) for c in crystals]).with_block_width(width)
        assert torch.equal(again.entry_slot, batch.entry_slot) and torch.equal(again.block_atom, batch.block_atom)
    from cfdist.batch import DEFAULT_BLOCK_WIDTH
    from cfdist.run.config import ComputeSection

    assert DEFAULT_BLOCK_WIDTH == ComputeSection().entry_chunk  # batches made outside a run use the run default


class OpTrace(TorchDispatchMode):
    """Names of every aten op dispatched (forward and backward); boolean-mask indexing named apart."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None):
            name = "index with a boolean mask"  # x[mask]: as data dependent as nonzero
        self.ops.add(name)
        return func(*args, **(kwargs or {}))


# aten ops whose output shape depends on tensor values, or that read a tensor on the host
DATA_DEPENDENT_OPS = {"nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
                      "unique_consecutive", "bincount", "repeat_interleave", "item", "_local_scalar_dense",
                      "is_nonzero", "equal", "allclose", "argwhere", "histc", "index with a boolean mask"}


@pytest.mark.parametrize("energy", [False, True])
def test_training_step_has_no_data_dependent_op_or_host_sync(megnet_crystals, energy):
    """A training step's forward and backward (a property model; an energy model with forces and
    stress, the double backward of force training included) dispatch no op whose output shape
    depends on tensor values and no host read of a tensor: the collate did that index work, so a
    device never waits for the host inside a step (docs/model.md, A step without host syncs)."""
    from conftest import energy_model

    from cfdist import Crystalformer, CrystalformerConfig

    crystals = megnet_crystals[:6]
    torch.manual_seed(0)
    model = energy_model(n_blocks=2).train() if energy else \
        Crystalformer(CrystalformerConfig(n_blocks=2, d_model=32, n_heads=4, d_ff=64, n_basis=16)).train()
    batch = make_batch(crystals, model.cutoff).to(dtype=model.embedding.weight.dtype)
    model.fit_sigma_statistics(batch)  # before the step, as the training loops do (it reads statistics on the host)
    with OpTrace() as trace:
        if energy:
            out = model(batch, forces=True, stress=True)
            loss = out.energy.sum() + (out.forces ** 2).sum() + (out.stress ** 2).sum()
        else:
            loss = (model(batch) ** 2).mean()
        loss.backward()
    assert "mm" in trace.ops or "addmm" in trace.ops  # the trace saw the step
    assert not trace.ops & DATA_DEPENDENT_OPS, sorted(trace.ops & DATA_DEPENDENT_OPS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pinned memory, device syncs)")
def test_cuda_batch_copies_are_pinned_and_a_training_step_never_syncs(megnet_crystals):
    """On a GPU: CrystalBatch.to("cuda") equals a plain copy, and a property model's training step
    (forward + backward) runs under torch.cuda.set_sync_debug_mode("error"), which raises on any
    host-device synchronisation (a .item(), nonzero, a device-to-host copy)."""
    from cfdist import Crystalformer, CrystalformerConfig

    crystals = megnet_crystals[:6]
    torch.manual_seed(0)
    model = Crystalformer(CrystalformerConfig(n_blocks=2, d_model=32, n_heads=4, d_ff=64, n_basis=16)).cuda().train()
    host = make_batch(crystals, model.cutoff).to(dtype=torch.float32)
    batch = host.to("cuda")
    for name in ("positions", "entry_i", "entry_pair", "entry_slot", "block_atom"):
        assert torch.equal(getattr(batch, name).cpu(), getattr(host, name))
    model.fit_sigma_statistics(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (model(batch) ** 2).mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
