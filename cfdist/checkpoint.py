"""Portable checkpoints: one file, loadable without DeepSpeed or Ray.

    cfdist.load("outputs/runs/pretrain/model.pt").predict(structures)

A portable checkpoint (``torch.save`` of a plain dict) holds the model config, float32
weights and buffers (sigma statistics, target normalisation; an energy model's per-element
reference energies stay float64), the model kind (``"property"``, ``"energy"`` or
``"energy+property"``, :func:`model_kind`), the image-table cutoff, the cfdist version and a
short training summary. :func:`load` returns either kind. Every checkpoint is read with
``torch.load(weights_only=True)`` (:func:`load_checkpoint_file`): tensors, numbers, strings and
containers only, so opening a checkpoint someone shared can never run code it carries. :func:`export_deepspeed_checkpoint` builds one
from a DeepSpeed checkpoint of any ZeRO stage and precision (``python -m cfdist.export``).

Training checkpoints (DeepSpeed state per rank + ``cfdist_state.json``) are written by
:mod:`cfdist.train.loop`; ``cfdist_state.json`` is what makes them self-describing.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from cfdist import __version__, storage
from cfdist.config import CrystalformerConfig
from cfdist.fileio import atomic_write
from cfdist.model import Crystalformer
from cfdist.run.deepspeed_import import import_deepspeed

FORMAT = "cfdist-portable-v1"
STATE_FILE = "cfdist_state.json"
DEEPSPEED_TAG = "ds"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds pickled objects beyond tensors and plain data (it could run code)."""


def load_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: plain dicts, lists, tuples, strings, numbers, tensors.

    Raises :class:`UnsafeCheckpointError` for a file that needs anything else to unpickle: cfdist
    never writes one, and unpickling arbitrary objects can execute code.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused to load: the file holds pickled Python objects beyond tensors and plain data "
            f"({reason}). cfdist checkpoints never do; unpickling such a file can run code it carries. "
            f"Load it only if you trust its author (torch.load with weights_only off) and re-save the "
            f"plain parts.") from None


def model_kind(config) -> str:
    """``"property"`` (the paper's mean-pooled heads only), ``"energy"`` (energy head only) or
    ``"energy+property"`` (both: a multi-task model), or ``"mixture"`` (a head per dataset) for a
    :class:`cfdist.CrystalformerConfig`."""
    if config.heads:
        return "mixture"
    if not config.energy:
        return "property"
    return "energy+property" if config.n_targets else "energy"


# Tensors the model keeps in float64 whatever its dtype (Crystalformer._apply); portable
# checkpoints keep them float64 too. Everything else floating is stored as float32.
FLOAT64_TENSORS = ("element_energy",)


def keeps_float64(name: str) -> bool:
    """Whether state-dict entry ``name`` is one of :data:`FLOAT64_TENSORS` (a model's own, or a
    mixture model's dataset head's: ``heads.<dataset>.element_energy``)."""
    return name.rsplit(".", 1)[-1] in FLOAT64_TENSORS


def portable_state_dict(model) -> dict[str, torch.Tensor]:
    """CPU copy of ``model.state_dict()``: floating tensors float32, except :data:`FLOAT64_TENSORS`
    (an energy model's per-element reference energies, eV/atom), which stay float64."""
    state = {}
    for name, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.to(torch.float64 if keeps_float64(name) else torch.float32)
        state[name] = value
    return state


def save_portable(path: str | Path, model, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (a :class:`cfdist.Crystalformer`) as a portable checkpoint.

    Weights and buffers are stored in float32 whatever the model's dtype, except an energy model's
    ``element_energy`` (eV/atom), which stays float64. The payload records the model kind
    (:func:`model_kind`).
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = portable_state_dict(model)
    payload = {"format": FORMAT, "cfdist_version": __version__, "kind": model_kind(model.config),
               "model_config": model.config.to_dict(), "cutoff": float(model.cutoff), "state_dict": state,
               "extra": extra or {}}
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu"):
    """Portable checkpoint -> :class:`cfdist.Crystalformer` in eval mode (float32 weights).

    Loads every kind: property models (also those written before checkpoints recorded a kind),
    energy models (reference energies float64) and multi-task models. ``model.checkpoint_info``
    holds ``kind``, ``cfdist_version``, ``cutoff`` and ``extra``.

    ``path`` may be ``s3://...`` / ``gs://...`` (a ``model.pt`` object, or a run prefix holding
    one): it is downloaded once into the user cache (keyed by the object's size and ETag, so a
    changed object is fetched again) and loaded from there, with ``weights_only=True`` as always.
    """

    if storage.is_uri(path):
        location = storage.absolute(path)
        if not storage.is_file(location):
            location = storage.join(location, "model.pt")
        try:
            path = storage.cached_copy(location, "checkpoints")
        except FileNotFoundError:
            raise FileNotFoundError(f"{location}: no portable checkpoint (export one with `cfdist export`)") from None
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no portable checkpoint (export one with `python -m cfdist.export RUN OUT`)")
    payload = load_checkpoint_file(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cfdist portable checkpoint (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r}); "
                         f"training checkpoints are exported with `python -m cfdist.export`")
    config = CrystalformerConfig.from_dict(payload["model_config"])
    kind = model_kind(config)
    recorded = payload.get("kind", "property")  # checkpoints before the energy model: property models
    if recorded != kind:
        raise ValueError(f"{path}: checkpoint says it holds a {recorded!r} model but its config describes "
                         f"a {kind!r} model; the file is inconsistent")
    model = Crystalformer(config)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    model.checkpoint_info = {"kind": kind, **{k: payload[k] for k in ("cfdist_version", "cutoff", "extra")}}
    return model


def read_state(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not a cfdist training checkpoint (no {STATE_FILE})")
    return json.loads(path.read_text())


def find_latest_checkpoint(run_dir: str | Path) -> Path:
    """The training checkpoint with the highest step under ``run_dir`` (any depth)."""
    found = []
    for state_path in Path(run_dir).rglob(STATE_FILE):
        try:
            found.append((json.loads(state_path.read_text())["step"], str(state_path.parent)))
        except (json.JSONDecodeError, KeyError):
            continue
    if not found:
        raise FileNotFoundError(f"{run_dir}: no training checkpoint found (no {STATE_FILE} below it)")
    return Path(max(found)[1])


def deepspeed_fp32_state_dict(checkpoint_dir: str | Path, tag: str = DEEPSPEED_TAG) -> dict[str, torch.Tensor]:
    """Consolidated float32 weights + buffers of a DeepSpeed checkpoint, any ZeRO stage.

    ZeRO 1-3 (and bf16, whose optimizer keeps fp32 masters): DeepSpeed's zero_to_fp32;
    stage 0 fp32 has no optimizer shards, so the module state is the fp32 state.
    """
    checkpoint_dir = Path(checkpoint_dir)
    module_file = checkpoint_dir / tag / "mp_rank_00_model_states.pt"  # ZeRO 0-2; ZeRO-3 has one per rank
    if not list((checkpoint_dir / tag).glob("*model_states.pt")):
        raise FileNotFoundError(f"{checkpoint_dir}: no DeepSpeed checkpoint with tag {tag!r}")
    shards = list((checkpoint_dir / tag).glob("*optim_states.pt"))
    if shards and any("zero_pp_rank" in p.name for p in shards):
        import_deepspeed()  # the package first, without its autotuner's MLflow import
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:
        state = load_checkpoint_file(module_file)["module"]
    return {k: v.to(torch.float64 if keeps_float64(k) else torch.float32) if v.is_floating_point() else v
            for k, v in state.items()}


def export_deepspeed_checkpoint(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """Training checkpoint directory -> portable checkpoint file ``out``."""

    checkpoint_dir = Path(checkpoint_dir)
    info = read_state(checkpoint_dir)
    model = Crystalformer(CrystalformerConfig.from_dict(info["model_config"]))
    state = deepspeed_fp32_state_dict(checkpoint_dir)
    # Statistics buffers at full precision from the state file (a bf16 engine rounds module buffers).
    for name, value in info.get("buffers", {}).items():
        buffer = model.get_buffer(name)
        state[name] = torch.tensor(value, dtype=buffer.dtype).reshape(buffer.shape)
    model.load_state_dict(state, strict=True)
    return save_portable(out, model, extra={"step": info["step"], "epoch": info["cursor"]["epoch"],
                                            "run_name": info.get("run_name"), "targets": info["model_config"]["target_names"],
                                            "source_checkpoint": str(checkpoint_dir)})
