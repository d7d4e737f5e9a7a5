"""Crystalformer: atom embedding -> encoder blocks of periodic attention -> mean pool -> MLP.

Defaults reproduce the published model (4 blocks, d = 128, 8 heads, FFN 512, K = 64;
853,505 trainable parameters). An energy model (``CrystalformerConfig(energy=True)``) adds an
energy head: per-atom energies from the final atom states, summed per crystal in float64 on
top of per-element reference energies; forces and stress come from autograd through the
geometry (positions and a symmetric strain of positions and lattice), so they are exactly
the derivatives of the energy. Each attention layer owns its Gaussian-width statistics
(``sigma_mean``, ``sigma_std`` buffers; docs/model.md, Sigma statistics): they start at
0 / 1, are set once before training by :meth:`Crystalformer.fit_sigma_statistics` (pooled over
all ranks), saved in checkpoints, and never changed by a forward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cfdist.batch import CrystalBatch, collate
from cfdist.config import CrystalformerConfig
from cfdist.crystal import from_record, validate as validate_crystal
from cfdist.geometry import image_table
from cfdist.graph import PeriodicGraph
from cfdist.ops.periodic_attention import periodic_attention


@dataclass
class EnergyOutput:
    """What an energy model's forward returns (B crystals, N atoms).

    Attributes:
        energy: (B,) total energy per crystal (eV), float64.
        forces: (N, 3) -dE/dr (eV/A), or None when not requested.
        stress: (B, 3, 3) (1/V) dE/d(strain) in eV/A^3 (ASE's convention: a compressed cell,
            which lowers its energy by expanding, has negative diagonal stress; the pressure is
            -trace / 3; eV/A^3 x 160.21766 = GPa), or None when not requested. Symmetric.
        properties: (B, n_targets) property-head outputs in normalised units ((B, 0) if none).
    """

    energy: torch.Tensor
    forces: torch.Tensor | None
    stress: torch.Tensor | None
    properties: torch.Tensor


def distributed_sum(stats: torch.Tensor) -> torch.Tensor:
    """Sum ``stats`` over the default process group's ranks (unchanged without one).

    The all-reduce :meth:`Crystalformer.fit_sigma_statistics` uses when given none.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        stats = stats.clone()
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM)
    return stats


class TableAttention:
    """Attention backend over sphere-cutoff image tables (the default)."""

    def prepare(self, batch: CrystalBatch, config: CrystalformerConfig, dtype: torch.dtype) -> PeriodicGraph:
        envelope = (config.envelope_kind, config.cutoff, config.envelope_width) if config.envelope else None
        return PeriodicGraph.build(batch, n_basis=config.n_basis, gbf_r_max=config.gbf_r_max,
                                   gbf_width_scale=config.gbf_width_scale, dtype=dtype, envelope=envelope)

    def __call__(self, q, k, v, a, geometry, edge_proj):
        return periodic_attention(q, k, v, a, geometry, edge_proj)


class PeriodicSelfAttention(nn.Module):
    """Multi-head infinitely connected attention of one encoder block.

    Gaussian width per (atom, head): s = q . w_h (projected query, before scaling),
    x = (s - m) / s_std with frozen statistics, rho = (1 - b) ELU(beta x / (1 - b)) + 1,
    sigma = r0 / sqrt(rho) <= r0 / sqrt(b); the op takes a = -1 / (2 sigma^2).
    """

    def __init__(self, config: CrystalformerConfig):
        super().__init__()
        d, h = config.d_model, config.n_heads
        self.config = config
        self.n_heads, self.head_dim = h, config.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.sigma_weight = nn.Parameter(torch.empty(h, self.head_dim))
        self.edge_proj = nn.Parameter(torch.empty(h, self.head_dim, config.n_basis)) if config.n_basis > 0 else None
        # frozen statistics of the score s (docs/model.md, Sigma statistics): set before training
        # by Crystalformer.fit_sigma_statistics, saved in checkpoints, never changed by a forward
        self.register_buffer("sigma_mean", torch.zeros(()))
        self.register_buffer("sigma_std", torch.ones(()))
        self.register_load_state_dict_pre_hook(_drop_legacy_sigma_ready)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, d) atom states -> (N, H, d_h) queries, keys and values."""
        shape = (x.shape[0], self.n_heads, self.head_dim)
        return self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)

    def score(self, q: torch.Tensor) -> torch.Tensor:
        """(N, H, d_h) queries -> (N, H) scores s = q . w_h, in >= float32."""
        acc = torch.promote_types(q.dtype, torch.float32)
        return (q.to(acc) * self.sigma_weight.to(acc)).sum(-1)

    def exponent(self, q: torch.Tensor) -> torch.Tensor:
        """(N, H, d_h) queries -> (N, H) coefficients a = -rho / (2 r0^2), in >= float32."""
        cfg = self.config
        score = self.score(q)
        x = (score - self.sigma_mean.to(score.dtype)) / self.sigma_std.to(score.dtype)
        b = cfg.rho_lower_bound
        rho = (1.0 - b) * F.elu(cfg.rho_beta * x / (1.0 - b)) + 1.0
        return -rho / (2.0 * cfg.r0 * cfg.r0)

    @torch.no_grad()
    def fit_statistics(self, score: torch.Tensor | None,
                       all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Set ``sigma_mean`` / ``sigma_std`` to the mean and unbiased std of the finite entries of
        ``score`` over all atoms and heads of every rank's batch.

        Non-finite scores are left out: a corrupt structure in the first batch (NaN positions make
        its atoms' scores NaN from the second block on) would otherwise set NaN statistics on every
        rank for good, and every later step would be skipped as bad; this way only its own step is.

        Args:
            score: (N, H) this rank's scores, or None for a rank without a batch (it adds zeros).
            all_reduce: sums a (3,) float64 tensor (count, sum, sum of squares) over ranks.
        """
        if score is None:
            stats = torch.zeros(3, dtype=torch.float64, device=self.sigma_mean.device)
        else:
            x = score.double().reshape(-1)
            x = x[torch.isfinite(x)]
            stats = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])
        count, total, total_sq = all_reduce(stats).tolist()
        if count < 1:
            raise ValueError("fit_sigma_statistics: no finite attention score on any rank; the first batch is "
                             "empty everywhere, or every structure in it has non-finite positions or lattice")
        mean = total / count
        var = max(total_sq - count * mean * mean, 0.0) / max(count - 1.0, 1.0)
        self.sigma_mean.fill_(mean)
        self.sigma_std.fill_(math.sqrt(var) if var > 0 else 1.0)

    def forward(self, x: torch.Tensor, geometry: Any, backend: Callable) -> torch.Tensor:
        """(N, d) atom states -> (N, d) attention output."""
        q, k, v = self.project(x)
        y = backend(q, k, v, self.exponent(q), geometry, self.edge_proj)
        return self.out_proj(y.reshape(x.shape[0], -1))


def _drop_legacy_sigma_ready(module, state_dict, prefix, *args) -> None:
    """cfdist 0.1.0 checkpoints hold a ``sigma_ready`` flag per layer (statistics were set lazily by
    the first training forward); a checkpoint's statistics are always set, so the flag is dropped."""
    state_dict.pop(prefix + "sigma_ready", None)


class EncoderBlock(nn.Module):
    """x <- x + attention(x); x <- x + FFN(x). No layer norm (T-Fixup), no dropout."""

    def __init__(self, config: CrystalformerConfig):
        super().__init__()
        self.attention = PeriodicSelfAttention(config)
        self.ffn = nn.Sequential(nn.Linear(config.d_model, config.d_ff), nn.ReLU(),
                                 nn.Linear(config.d_ff, config.d_model))

    def forward(self, x: torch.Tensor, geometry: Any, backend: Callable) -> torch.Tensor:
        x = x + self.attention(x, geometry, backend)
        return x + self.ffn(x)


class OutputHeads:
    """The output side of a model, shared by :class:`Crystalformer` (its own head) and each
    :class:`DatasetHead` of a mixture model: a property head (mean pooling + MLP, one output per
    target, standardised with the ``target_mean`` / ``target_std`` buffers, output transforms) and
    / or an energy head (per-atom energies on float64 per-element references ``element_energy``,
    scaled by ``energy_scale``). Methods take the encoder's (N, d) atom states."""

    def _build_outputs(self, d_model: int, head_hidden: int, n_elements: int, target_names: Sequence[str],
                       transform_of: Callable[[str], str], energy: bool) -> None:
        self.is_energy = bool(energy)
        n_targets = len(target_names)
        self.head = nn.Sequential(nn.Linear(d_model, head_hidden), nn.ReLU(),
                                  nn.Linear(head_hidden, n_targets)) if n_targets else None
        self.register_buffer("target_mean", torch.zeros(n_targets))
        self.register_buffer("target_std", torch.ones(n_targets))
        # which outputs carry which transform; derived from the config, so not saved in state
        # dicts (persistent=False) but moved with the module
        kinds = [transform_of(t) for t in target_names]
        self.register_buffer("softplus_mask", torch.tensor([k == "softplus" for k in kinds], dtype=torch.bool),
                             persistent=False)
        self.register_buffer("log_mask", torch.tensor([k == "log" for k in kinds], dtype=torch.bool),
                             persistent=False)
        self._any_softplus, self._any_log = "softplus" in kinds, "log" in kinds
        if energy:
            # per-atom energy = energy_scale * head(x) + the atom's element reference (eV/atom);
            # the references are fitted on the training data and kept in float64 (_apply)
            self.energy_head = nn.Sequential(nn.Linear(d_model, head_hidden), nn.SiLU(), nn.Linear(head_hidden, 1))
            self.register_buffer("element_energy", torch.zeros(n_elements, dtype=torch.float64))
            self.register_buffer("energy_scale", torch.ones(()))

    def reset_outputs(self) -> None:
        if self.head is not None:
            for lin in (self.head[0], self.head[2]):
                lin.reset_parameters()
        if self.is_energy:
            for lin in (self.energy_head[0], self.energy_head[2]):
                lin.reset_parameters()

    def _apply(self, fn, recurse=True):
        # .float() / .half() / .to(dtype) would round the reference energies (tens to hundreds
        # of eV per crystal) to float32; they stay float64 and follow the module's device only.
        reference = self.element_energy.detach().clone() if self.is_energy else None
        super()._apply(fn, recurse)
        if reference is not None:
            self.element_energy = reference.to(device=self.target_mean.device, dtype=torch.float64)
        return self

    def properties(self, x: torch.Tensor, batch: CrystalBatch) -> torch.Tensor:
        """(N, d) atom states -> (B, n_targets): mean pooling and the property head."""
        if self.head is None:  # an energy-only model
            return x.new_zeros(batch.n_crystals, 0)
        counts = batch.n_atoms.to(x.device)
        pooled = x.new_zeros(len(counts), x.shape[1]).index_add_(0, batch.atom_crystal, x)
        pooled = pooled / counts[:, None].to(x.dtype)
        return self.output_transform(self.head(pooled))

    def output_transform(self, h: torch.Tensor) -> torch.Tensor:
        """(B, n_targets) head outputs -> normalised predictions, with each ``softplus`` target's
        output mapped to (softplus(h + m / s) - m / s): its de-normalised prediction s * softplus(h
        + m / s) is >= 0 for every input and ~ the identity well above zero, so the head keeps the
        standardised scale of the others. ``log`` targets are learnt in log10 space (no change
        here; :meth:`denormalize` exponentiates)."""
        if not self._any_softplus:
            return h
        shift = (self.target_mean / self.target_std).to(h.dtype)
        return torch.where(self.softplus_mask, F.softplus(h + shift) - shift, h)

    def label_space(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, n_targets) labels in original units -> the space the model learns in: log10 of
        ``log`` targets (non-positive labels become NaN = missing), the rest unchanged."""
        if not self._any_log:
            return labels
        mask = self.log_mask.to(labels.device)
        positive = mask & (labels > 0)
        logged = torch.log10(torch.where(positive, labels, torch.ones_like(labels)))
        return torch.where(positive, logged, torch.where(mask, torch.full_like(labels, float("nan")), labels))

    def crystal_energy(self, x: torch.Tensor, batch: CrystalBatch) -> torch.Tensor:
        """(N, d) atom states -> (B,) float64 energies: sum of scaled per-atom head outputs plus
        the occupancy-weighted element references, accumulated in float64."""
        per_atom = self.energy_head(x).squeeze(-1).double() * self.energy_scale.double()
        reference = self.element_energy[batch.species_z - 1] * batch.species_occupancy.to(torch.float64)
        per_atom = per_atom.index_add(0, batch.species_site, reference.to(per_atom.device))
        return per_atom.new_zeros(batch.n_crystals).index_add_(0, batch.atom_crystal, per_atom)

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        """(B, n_targets) normalised predictions -> original units, with the output transforms
        undone: 10 ** of ``log`` targets; ``softplus`` targets clamped at 0, which only removes the
        rounding of s * (softplus(.) - m / s) + m (the value is already s * softplus(.) >= 0)."""
        y = y * self.target_std.to(y.dtype) + self.target_mean.to(y.dtype)
        if self._any_log:
            y = torch.where(self.log_mask.to(y.device), torch.pow(10.0, y), y)
        if self._any_softplus:
            y = torch.where(self.softplus_mask.to(y.device), y.clamp_min(0.0), y)
        return y

    def zero_touch(self, x: torch.Tensor) -> torch.Tensor:
        """0 * (this head's outputs on one atom state): a scalar zero whose graph reaches every
        parameter of the head (:meth:`Crystalformer.forward` of a mixture model, see there)."""
        parts = [m(x[:1]).sum() for m in (self.head, getattr(self, "energy_head", None)) if m is not None]
        return 0.0 * torch.stack(parts).sum()


class DatasetHead(OutputHeads, nn.Module):
    """One dataset's output head of a mixture model (:class:`cfdist.config.HeadSpec`): the same
    parameters and buffers as a single-dataset model's own head, under ``heads.<name>.``."""

    def __init__(self, spec, config: CrystalformerConfig):
        super().__init__()
        self.spec = spec
        self._build_outputs(config.d_model, config.head_hidden, config.n_elements, spec.property_targets,
                            spec.transform_of, spec.energy)
        self.reset_outputs()

    @property
    def target_names(self) -> list[str]:
        return self.spec.property_targets


class Crystalformer(OutputHeads, nn.Module):
    """The Crystalformer model.

    ``forward(batch)`` returns (B, n_targets) predictions in normalised target units;
    :meth:`predict` takes structures and returns de-normalised predictions. A mixture model
    (``config.heads``) has one :class:`DatasetHead` per dataset on the shared encoder, and every
    forward names its dataset (``dataset=``).
    """

    def __init__(self, config: CrystalformerConfig | None = None):
        super().__init__()
        self.config = config = config or CrystalformerConfig()
        self.embedding = nn.Linear(config.n_elements, config.d_model, bias=False)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_blocks))
        self._build_outputs(config.d_model, config.head_hidden, config.n_elements, config.target_names,
                            config.transform_of, config.energy)
        self.heads = nn.ModuleDict({spec.name: DatasetHead(spec, config) for spec in config.heads}) \
            if config.heads else None
        self.attention_backend: Any = TableAttention()
        self.activation_checkpointing = False
        self.compile_backend: str | None = None  # set by cfdist.compile.compile_model
        self.reset_parameters()

    @property
    def target_names(self) -> list[str]:
        return list(self.config.target_names)

    def output(self, dataset: str | None = None) -> OutputHeads:
        """The head a forward uses: the model's own (``dataset`` None), or a mixture model's head
        of that dataset."""
        if self.heads is None:
            if dataset is not None:
                raise ValueError(f"dataset {dataset!r} given, but this model has no per-dataset heads")
            return self
        if dataset is None:
            raise ValueError(f"a model with per-dataset heads needs the dataset of its input; heads: "
                             f"{list(self.heads)}")
        if dataset not in self.heads:
            raise ValueError(f"this model has no head for dataset {dataset!r}; heads: {list(self.heads)}")
        return self.heads[dataset]

    def for_dataset(self, dataset: str) -> "Crystalformer":
        """A single-dataset model made of this mixture model's encoder and the head of ``dataset``:
        it computes what ``forward(..., dataset=dataset)`` computes (same weights, buffers, envelope),
        and everything that takes a single model (``cfdist predict`` / ``evaluate``, the ASE
        calculator) takes it."""
        spec = self.config.head(dataset)
        config = CrystalformerConfig.from_dict({**self.config.to_dict(), "heads": [], "energy": spec.energy,
                                                "target_names": spec.property_targets,
                                                "target_transforms": dict(spec.transforms)})
        param = self.embedding.weight
        # in this model's dtype before the weights are copied (a float32 module would round float64 ones)
        single = Crystalformer(config).to(device=param.device, dtype=param.dtype)
        single.load_state_dict(self.single_state_dict(dataset))
        return single.train(self.training)

    def single_state_dict(self, dataset: str | None = None) -> dict[str, torch.Tensor]:
        """This mixture model's state under a single-dataset model's names: the encoder's entries
        and, when ``dataset`` is given, that dataset's head entries without their ``heads.<name>.``
        prefix (the other heads left out)."""
        prefix = f"heads.{dataset}." if dataset is not None else None
        state = {}
        for key, value in self.state_dict().items():
            if not key.startswith("heads."):
                state[key] = value
            elif prefix is not None and key.startswith(prefix):
                state[key[len(prefix):]] = value
        return state

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    def reset_parameters(self) -> None:
        """T-Fixup initialisation (Huang et al. 2020), as the reference applies it (docs/model.md, Model)."""
        cfg = self.config
        n_layers = cfg.n_blocks
        nn.init.normal_(self.embedding.weight, std=cfg.d_model ** -0.5 * (9 * n_layers) ** -0.25)
        scale = 0.67 * n_layers ** -0.25
        for block in self.blocks:
            att = block.attention
            for lin in (att.q_proj, att.k_proj, att.v_proj, att.out_proj, block.ffn[0], block.ffn[2]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            with torch.no_grad():
                for lin in (att.v_proj, att.out_proj, block.ffn[0], block.ffn[2]):
                    lin.weight.mul_(scale)
            nn.init.normal_(att.sigma_weight, std=att.head_dim ** -0.5)
            if att.edge_proj is not None:
                # Xavier on W^E viewed as one (H d_h) x K matrix, gain K^-1/2.
                flat = att.edge_proj.data.view(-1, cfg.n_basis)
                nn.init.xavier_uniform_(flat, gain=cfg.n_basis ** -0.5)
        self.reset_outputs()
        for head in (self.heads or {}).values():
            head.reset_outputs()

    @property
    def sigma_stats_ready(self) -> bool:
        """Whether the sigma statistics were set (:meth:`fit_sigma_statistics`, or a loaded checkpoint):
        every layer's differ from the initial 0 / 1, which a fitted mean of a continuous score never equals."""
        return all(float(b.attention.sigma_mean) != 0.0 or float(b.attention.sigma_std) != 1.0 for b in self.blocks)

    @torch.no_grad()
    def fit_sigma_statistics(self, batch: CrystalBatch | None,
                             all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set every layer's sigma statistics from the first training batch, in one explicit pass.

        Call it once on a new model, before it is compiled or wrapped by DeepSpeed / DDP (the
        training loops do). A forward over ``batch`` in which block k's statistics are fitted to
        its scores s = q . w_h, the scores of block k-1's output computed with block k-1's fitted
        statistics; (count, sum of s, sum of s^2) are summed over ranks with ``all_reduce``, so
        every rank sets the same values (docs/model.md, Sigma statistics). The same numbers as
        the first training forward set before this pass existed.

        Args:
            batch: this rank's first training batch on the model's device, or None for a rank
                without one (it still joins every all-reduce, with zeros).
            all_reduce: sums a (3,) float64 tensor over ranks; None: :func:`distributed_sum`
                (the default process group when one is initialised, else this process alone).
        """
        all_reduce = all_reduce or distributed_sum
        if batch is None:
            for block in self.blocks:
                block.attention.fit_statistics(None, all_reduce)
            return
        dtype = self.embedding.weight.dtype
        geometry = self.geometry(batch, dtype)
        x = self.embed(batch, dtype)
        for block in self.blocks:
            q, _, _ = block.attention.project(x)
            block.attention.fit_statistics(block.attention.score(q), all_reduce)
            x = block(x, geometry, self.attention_backend)

    def embed(self, batch: CrystalBatch, dtype: torch.dtype) -> torch.Tensor:
        """(N, d) atom states: occupancy-weighted sum of species embeddings (one-hot of Z - 1)."""
        weight = self.embedding.weight.t()  # (n_elements, d)
        contrib = weight[batch.species_z - 1] * batch.species_occupancy.to(weight.dtype)[:, None]
        n_atoms = batch.positions.shape[0]
        return weight.new_zeros(n_atoms, weight.shape[1]).index_add_(0, batch.species_site, contrib).to(dtype)

    def geometry(self, batch: CrystalBatch, dtype: torch.dtype) -> Any:
        """The attention backend's per-batch geometry (a :class:`PeriodicGraph` by default)."""
        if batch.cutoff + 1e-9 < self.cutoff:
            raise ValueError(f"batch image tables were built with cutoff {batch.cutoff:.4f} A but the model "
                             f"needs {self.cutoff:.4f} A (cutoff_sigmas={self.config.cutoff_sigmas}); rebuild them")
        return self.attention_backend.prepare(batch, self.config, dtype)

    def encode(self, batch: CrystalBatch) -> torch.Tensor:
        """(N, d) final atom states."""
        dtype = self.embedding.weight.dtype
        geometry = self.geometry(batch, dtype)
        x = self.embed(batch, dtype)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, geometry, self.attention_backend, use_reentrant=False)
            else:
                x = block(x, geometry, self.attention_backend)
        return x

    def forward(self, batch: CrystalBatch, *, forces: bool = False, stress: bool = False,
                dataset: str | None = None):
        """Property model: (B, n_targets) predictions in normalised target units.

        Energy model: an :class:`EnergyOutput` (energies, and forces / stress when asked; the
        graph for them is kept (``create_graph``) while training, so a loss on forces trains).

        A mixture model: ``dataset`` picks the head (property or energy, as above). While
        training, the other heads add an exact zero computed from their parameters
        (:meth:`OutputHeads.zero_touch`), so every rank's backward reaches every parameter even
        when ranks draw different datasets: DDP and DeepSpeed then reduce the same gradients on
        every rank (zeros for the heads not drawn) instead of waiting on ones that never come.
        """
        head = self.output(dataset)
        if head.is_energy:
            return self.energy_forward(batch, forces=forces, stress=stress, dataset=dataset)
        x = self.encode(batch)
        return self._touch_others(head.properties(x, batch), x, dataset)

    def _touch_others(self, y: torch.Tensor, x: torch.Tensor, dataset: str | None) -> torch.Tensor:
        """``y`` + the zero touches of the heads other than ``dataset``'s (training a mixture model)."""
        if self.heads is None or not (self.training and torch.is_grad_enabled()):
            return y
        touch = sum(h.zero_touch(x) for name, h in self.heads.items() if name != dataset)
        return y + touch.to(y.dtype) if isinstance(touch, torch.Tensor) else y

    def energy_forward(self, batch: CrystalBatch, *, forces: bool = False, stress: bool = False,
                       create_graph: bool | None = None, dataset: str | None = None) -> EnergyOutput:
        """Energies (B,) in float64 and, on request, forces and stress by autograd.

        Stress: a symmetric strain eps (B, 3, 3) acts on positions and lattice, r -> r (1 + eps);
        sigma = (1/V) dE/d(eps) at eps = 0 (ASE's convention). ``create_graph`` (default: in
        training mode) keeps the graph of forces and stress so that a loss on them trains.
        """
        head = self.output(dataset)
        if not head.is_energy:
            raise ValueError("energy_forward needs an energy model (CrystalformerConfig(energy=True))"
                             + (f"; head {dataset!r} predicts properties" if dataset else ""))
        create_graph = self.training if create_graph is None else create_graph
        geo_dtype = torch.promote_types(self.embedding.weight.dtype, torch.float32)
        inputs = []
        # (under torch.no_grad too, e.g. in predict: the derivatives need a graph of the geometry)
        with torch.enable_grad() if (forces or stress) else contextlib.nullcontext():
            positions = batch.positions.to(geo_dtype)
            lattice = batch.lattice.to(geo_dtype)
            if forces:
                positions = positions.detach().requires_grad_(True)
                inputs.append(positions)
            if stress:
                strain = torch.zeros_like(lattice, requires_grad=True)
                inputs.append(strain)
                deform = torch.eye(3, dtype=geo_dtype, device=lattice.device) + 0.5 * (strain + strain.transpose(1, 2))
                positions = torch.bmm(positions.unsqueeze(1), deform[batch.atom_crystal]).squeeze(1)
                lattice = torch.bmm(lattice, deform)
            if inputs:
                batch = dataclass_replace(batch, positions=positions, lattice=lattice)
            x = self.encode(batch)
            energy = self._touch_others(head.crystal_energy(x, batch), x, dataset)
            grads = [None, None]
            if inputs:
                found = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph)
                grads = [found[0] if forces else None, found[-1] if stress else None]
        out_forces = -grads[0] if forces else None
        out_stress = None
        if stress:
            volume = torch.linalg.det(batch.lattice.detach().to(geo_dtype)).abs()
            out_stress = grads[1] / volume[:, None, None]
        return EnergyOutput(energy=energy, forces=out_forces, stress=out_stress, properties=head.properties(x, batch))

    @torch.no_grad()
    def predict(self, structures: Sequence[Any], batch_size: int = 64, *, validate: bool = True,
                forces: bool = False, stress: bool = False, dataset: str | None = None) -> torch.Tensor | dict[str, Any]:
        """Predict for pymatgen Structures, ASE Atoms or :class:`cfdist.Crystal` records.

        Runs in eval mode (sigma statistics untouched) and builds image tables with the
        model's cutoff.

        Property model (``energy=False``): returns (n, n_targets) de-normalised predictions in
        the model's dtype (``model.double().predict(...)`` computes in float64); ``forces`` and
        ``stress`` must stay False.

        Energy model: returns a dict with ``"energy"`` (n,) float64 total energies (eV), with
        ``"forces"`` a list of n (N_i, 3) tensors (eV/A, -dE/dr) when ``forces``, with
        ``"stress"`` (n, 3, 3) (eV/A^3, ASE's sign convention: (1/V) dE/d(strain); multiply by
        ``ase.units.GPa**-1`` ~ 160.2 for GPa) when ``stress``, and one (n,) de-normalised tensor
        per property name when the model also has property heads (multi-task).

        A mixture model predicts with the head of ``dataset`` (required), as the model of that
        dataset would.
        """
        head = self.output(dataset)
        energy_model = head.is_energy
        target_names = head.target_names
        if (forces or stress) and not energy_model:
            raise ValueError("forces and stress need an energy model (CrystalformerConfig(energy=True))")
        param = self.embedding.weight
        was_training = self.training
        self.eval()
        try:
            outputs = []
            for start in range(0, len(structures), batch_size):
                crystals = [from_record(s) for s in structures[start:start + batch_size]]
                if validate:
                    crystals = [validate_crystal(c) for c in crystals]
                tables = [image_table(c.lattice, c.positions, self.cutoff) for c in crystals]
                batch = collate(crystals, tables).to(param.device)
                if energy_model:
                    # energy_forward builds the strained geometry before its own enable_grad block
                    with torch.enable_grad() if (forces or stress) else contextlib.nullcontext():
                        out = self.energy_forward(batch, forces=forces, stress=stress, create_graph=False,
                                                  dataset=dataset)
                    split = batch.n_atoms.tolist()
                    outputs.append((out.energy.detach(),
                                    list(out.forces.detach().split(split)) if forces else None,
                                    out.stress.detach() if stress else None,
                                    head.denormalize(out.properties.detach())))
                else:
                    outputs.append(head.denormalize(self(batch, dataset=dataset)))
            if not energy_model:
                if not outputs:
                    return param.new_zeros(0, len(target_names))
                return torch.cat(outputs)
            geo_dtype = torch.promote_types(param.dtype, torch.float32)
            result: dict[str, Any] = {
                "energy": torch.cat([o[0] for o in outputs]) if outputs
                else torch.zeros(0, dtype=torch.float64, device=param.device)}
            if forces:
                result["forces"] = [f for o in outputs for f in o[1]]
            if stress:
                result["stress"] = torch.cat([o[2] for o in outputs]) if outputs \
                    else torch.zeros(0, 3, 3, dtype=geo_dtype, device=param.device)
            properties = torch.cat([o[3] for o in outputs]) if outputs \
                else param.new_zeros(0, len(target_names))
            for k, name in enumerate(target_names):
                if name in result or name in ("forces", "stress"):
                    raise ValueError(f"property name {name!r} clashes with a key of predict's result")
                result[name] = properties[:, k]
            return result
        finally:
            self.train(was_training)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

