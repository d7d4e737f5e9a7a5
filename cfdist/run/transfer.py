"""Building the model to fine-tune from a portable checkpoint, and freezing layers (per-layer
learning rates: :func:`cfdist.run.optim.parameter_groups`); starting a pretraining run from a
checkpoint's encoder (:func:`init_from_checkpoint`, pretraining's ``init_from``).

Heads (``transfer.head``): the Crystalformer head is ``Linear(d, hidden) -> ReLU -> Linear(hidden,
n_targets)``; output row k and ``target_mean[k]`` / ``target_std[k]`` belong to target k.

Transfer both ways: an energy checkpoint (``energy: true``, no property head) fine-tunes into a
property model (the encoder is copied, the property head is new); a property checkpoint starts an
energy pretraining run (``init_from``: the encoder is copied, the energy head is new and the
reference energies are fitted on the run's data).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from cfdist.checkpoint import load
from cfdist.config import ConfigError, CrystalformerConfig
from cfdist.model import Crystalformer


def model_from_pretrained(path, targets: Sequence[str], head: str = "auto",
                          train_stats: dict[str, tuple[float, float]] | None = None,
                          transforms: Mapping[str, str] | None = None):
    """A :class:`cfdist.Crystalformer` for ``targets`` initialised from the portable checkpoint ``path``.

    The encoder (embedding, blocks, their frozen sigma statistics) is copied. ``head``:
    ``auto`` copies the hidden layer and the output rows (and normalisation) of targets the
    checkpoint knows, fresh rows for new ones; ``keep`` requires identical targets;
    ``replace`` re-initialises the head. New targets are standardised with ``train_stats``.
    ``transforms``: the run's output transforms (``data.transforms``); a target's row and
    normalisation are copied only when the checkpoint learnt it under the same transform (a
    ``log`` row lives in log10 space), else it is new.

    An energy checkpoint gives a property model (``energy`` off; the energy head and reference
    energies are left behind, the encoder, including its cutoff envelope, is copied): with
    ``auto`` the property head is new unless the checkpoint also has one (a multi-task model).

    Returns (model, report) where report says which targets were copied and which are new.
    """

    source = load(path)
    targets = list(targets)
    src, head, picked = pretrained_head(source, path, targets, head)
    old = list(src.target_names)
    if head == "keep" and old != targets:
        raise ConfigError(f"transfer.head=keep needs the checkpoint's targets {old}, got data.targets {targets}; "
                          f"use transfer.head=auto or replace")
    config = CrystalformerConfig.from_dict({**source.config.to_dict(), "target_names": targets, "energy": False,
                                            "target_transforms": dict(transforms or {}), "heads": []})
    # a fresh head (_NoHead: replace, or no matching dataset head) has no targets to compare
    src_transform = (source.config.transform_of if src is source else
                     src.spec.transform_of if src.head is not None else (lambda name: None))
    same_space = {t for t in targets if t in old and src_transform(t) == config.transform_of(t)}
    if head == "keep" and len(same_space) != len(targets):
        changed = {t: (source.config.transform_of(t), config.transform_of(t)) for t in targets if t not in same_space}
        raise ConfigError(f"transfer.head=keep but the output transforms differ from the checkpoint's "
                          f"(checkpoint, run): {changed}; use transfer.head=auto or replace")
    model = Crystalformer(config)  # fresh head initialisation for whatever is not copied below
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("head.", "energy_head.", "heads."))
             and k not in ("target_mean", "target_std", "element_energy", "energy_scale")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == {k for k in model.state_dict() if k.startswith("head.")} | \
        {"target_mean", "target_std"}, (missing, unexpected)
    copied: list[str] = []
    with torch.no_grad():
        if head != "replace" and src.head is not None:
            model.head[0].load_state_dict(src.head[0].state_dict())
            for k, name in enumerate(targets):
                if name in same_space:
                    j = old.index(name)
                    model.head[2].weight[k] = src.head[2].weight[j]
                    model.head[2].bias[k] = src.head[2].bias[j]
                    model.target_mean[k], model.target_std[k] = src.target_mean[j], src.target_std[j]
                    copied.append(name)
        for k, name in enumerate(targets):
            if name not in copied:
                if train_stats is None or name not in train_stats:
                    raise ValueError(f"target {name!r} is new to the checkpoint and has no train statistics")
                model.target_mean[k], model.target_std[k] = train_stats[name]
    report = {"checkpoint": str(path), "checkpoint_targets": old, "head": head, "copied_targets": copied,
              "new_targets": [t for t in targets if t not in copied],
              "checkpoint_energy_model": bool(source.config.energy),
              "sigma_stats_ready": model.sigma_stats_ready}
    if picked is not None:
        report["pretrained_head"] = picked
    return model, report


def pretrained_head(source, path, targets: Sequence[str], head: str):
    """(the checkpoint's output head to start from, the head mode to apply, the dataset picked or
    None). A single-dataset checkpoint: itself and ``head`` as given. A mixture checkpoint: the
    property head of the dataset ``head`` names (copied per target, as ``auto``), or for ``auto`` /
    ``keep`` the property head predicting most of (``keep``: exactly) ``targets``; ``replace`` or no
    such head: none (a fresh head)."""
    if not source.config.heads:
        if head not in ("auto", "keep", "replace"):
            raise ConfigError(f"transfer.head={head!r}: {path} was not pretrained on a mixture, so it has no "
                              f"per-dataset heads; use auto, keep or replace")
        return source, head, None
    specs = {spec.name: spec for spec in source.config.heads}
    properties = [name for name, spec in specs.items() if not spec.energy]
    if head in specs:
        if specs[head].energy:
            raise ConfigError(f"transfer.head={head}: that dataset's head predicts energies; fine-tuning a property "
                              f"model starts from a property head ({properties or 'the checkpoint has none'}) or "
                              f"replace")
        return source.heads[head], "auto", head
    if head not in ("auto", "keep", "replace"):
        raise ConfigError(f"transfer.head={head!r}: not a head mode (auto, keep, replace) nor one of the checkpoint's "
                          f"datasets {list(specs)}")
    if head != "replace":
        overlap = {name: len(set(specs[name].targets) & set(targets)) for name in properties}
        if head == "keep":
            exact = [name for name in properties if list(specs[name].targets) == list(targets)]
            if not exact:
                raise ConfigError(f"transfer.head=keep: no dataset head of {path} predicts exactly {list(targets)} "
                                  f"(heads: { {n: s.targets for n, s in specs.items()} }); name one or use auto")
            return source.heads[exact[0]], "keep", exact[0]
        best = max(properties, key=lambda name: overlap[name], default=None)
        if best is not None and overlap[best] > 0:
            return source.heads[best], "auto", best
    return _NoHead(), "replace", None


class _NoHead:
    """A checkpoint side without a property head (a fresh head is made)."""

    head = None
    target_names: list[str] = []


# Hyper-parameters that define the encoder's weights and what they compute; pretraining's
# init_from copies an encoder only into a model that agrees on all of them.
ENCODER_KEYS = ("n_blocks", "d_model", "n_heads", "d_ff", "n_basis", "r0", "rho_lower_bound", "rho_beta",
                "gbf_r_max", "gbf_width_scale", "cutoff_sigmas", "n_elements")


def encoder_mismatch(config: CrystalformerConfig, source: CrystalformerConfig) -> dict[str, tuple]:
    """{key: (config's value, source's value)} for the encoder hyper-parameters that differ."""
    return {k: (getattr(config, k), getattr(source, k)) for k in ENCODER_KEYS
            if getattr(config, k) != getattr(source, k)}


def check_encoder(config: CrystalformerConfig, source: CrystalformerConfig, path) -> None:
    """:class:`ConfigError` naming the differing keys unless ``source``'s encoder fits ``config``."""
    diff = encoder_mismatch(config, source)
    if diff:
        wanted = {k: getattr(source, k) for k in ENCODER_KEYS}
        raise ConfigError(f"init_from={path}: the run's model differs from the checkpoint's encoder in "
                          + ", ".join(f"{k} ({a} here, {b} there)" for k, (a, b) in diff.items())
                          + f"; set model to the checkpoint's architecture, e.g. model={wanted}")


def init_from_checkpoint(model, path, head: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """Start a pretraining model from the portable checkpoint ``path`` (pretraining's ``init_from``).

    Copies the encoder (embedding, blocks and their frozen sigma statistics). An energy model
    also gets the checkpoint's energy head, reference energies and energy scale when the
    checkpoint is an energy model (else they stay fresh and the trainer fits the references); a
    property model gets the checkpoint's property head and normalisation when both predict the
    same targets. The cutoff envelope is a model setting, not a weight: a property checkpoint
    (no envelope) trained as an energy model runs with the energy model's envelope.

    A checkpoint pretrained on a mixture has a head per dataset: ``head`` names the dataset whose
    head plays the checkpoint's own head above (empty: the encoder only). A mixture model being
    trained takes the encoder only.

    Returns (report, buffers): ``buffers`` are the copied buffers at full precision, for the caller
    to write again after a DeepSpeed engine has cast the module (bf16 would round them).
    """

    source = load(path)
    check_encoder(model.config, source.config, path)
    if model.config.heads and head:
        raise ConfigError(f"init_head={head}: a mixture run starts from a checkpoint's encoder only (its heads are "
                          f"new); drop init_head")
    source_heads = [h.name for h in source.config.heads]
    if head and head not in source_heads:
        raise ConfigError(f"init_head={head}: {path} has "
                          + (f"no head of that name (its heads: {source_heads})" if source_heads
                             else "no per-dataset heads (it was not pretrained on a mixture)"))
    if source_heads:  # the named head's entries as if they were the checkpoint's own head
        state = source.single_state_dict(head or None)
        spec = source.config.head(head) if head else None
        source_energy, source_targets = bool(spec and spec.energy), (spec.property_targets if spec else [])
    else:
        state = source.state_dict()
        source_energy, source_targets = bool(source.config.energy), list(source.config.target_names)
    prefixes = ["embedding.", "blocks."]
    energy_head = property_head = None
    if model.config.energy:
        energy_head = "kept" if source_energy else "fresh"
        if source_energy:
            prefixes += ["energy_head.", "element_energy", "energy_scale"]
    if model.head is not None:
        same = bool(source_targets) and list(source_targets) == list(model.config.target_names)
        property_head = "kept" if same else "fresh"
        if same:
            prefixes += ["head.", "target_mean", "target_std"]
    state = {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}
    own = model.state_dict()
    missing = [k for k in own if k.startswith(tuple(prefixes)) and k not in state]
    if missing:
        raise ConfigError(f"init_from={path}: the checkpoint lacks {missing[:5]}")
    model.load_state_dict(state, strict=False)
    buffers = {name: value.detach().clone() for name, value in state.items() if name in dict(model.named_buffers())}
    report = {"init_from": str(path), "checkpoint_kind": "energy" if source_energy else "property",
              "copied": sorted({k.split(".")[0] for k in state}), "energy_head": energy_head,
              "property_head": property_head}
    if source_heads:
        report["checkpoint_kind"] = "mixture"
        report["init_head"] = head or None
    return report, buffers


def freeze(model: nn.Module, *, embedding: bool, blocks: int) -> list[str]:
    """Turn off gradients of the embedding (if ``embedding``) and of the first ``blocks`` blocks.

    Returns the names of the frozen parameters.
    """
    if blocks > len(model.blocks):
        raise ConfigError(f"transfer.freeze_blocks={blocks} but the model has {len(model.blocks)} blocks")
    frozen = []
    prefixes = (["embedding."] if embedding else []) + [f"blocks.{i}." for i in range(blocks)]
    for name, param in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen
