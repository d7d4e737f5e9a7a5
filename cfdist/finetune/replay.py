"""Replay of a pretraining dataset while fine-tuning (``replay`` section), against forgetting.

MACE's multi-head fine-tuning (``--multiheads_finetuning``, ``--pt_train_file``) keeps training the
foundation model's head on a sample of its pretraining data beside the new task's head, so the
shared encoder does not drift away from what the pretraining taught it. Here:

- the model trained is a two-head mixture model (:class:`cfdist.config.HeadSpec`): head
  :data:`TASK` is the fine-tuning model's own head (as ``transfer.head`` made it), the other is the
  checkpoint's head ``replay.head`` (a mixture checkpoint's dataset, or a single-dataset
  checkpoint's own energy / property head), copied with its reference energies or standardisation;
- every optimiser step holds ``data.batch_size`` task structures and ``round(replay.fraction *
  data.batch_size)`` replay structures (:func:`replay_steps`: the replay set's train split,
  reshuffled for every epoch of the task, so each epoch sees another random sample of a large set),
  packed into micro-batches of their own, each going to its head and its loss
  (:class:`cfdist.run.objective.MixtureObjective`: the step's loss is the task's mean plus the
  replay's mean);
- validation, the best-checkpoint choice and the test split measure the task head only, and every
  portable checkpoint (``best.pt``, ``swa.pt``, ``final.pt``) is the task's single-dataset model
  (:meth:`cfdist.model.Crystalformer.for_dataset`); ``last.pt`` keeps both heads for the resume.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import pyarrow as pa
from cfdist.config import ConfigError, CrystalformerConfig, HeadSpec
from cfdist.model import Crystalformer
from cfdist.run.objective import EnergyObjective, Objective, PropertyObjective
from cfdist.stream import EpochPlan, RowGroupReader, stream_seed

TASK = "task"  # the fine-tuning task's head in a model trained with replay
SINGLE_HEAD = "pretrain"  # the replay head's name when the checkpoint has no per-dataset heads


def replay_spec(checkpoint: Crystalformer, section) -> HeadSpec:
    """The replay head: the checkpoint's head ``section.head`` (mixture) or its own head."""
    heads = [h.name for h in checkpoint.config.heads]
    if heads:
        if section.head not in heads:
            raise ConfigError(f"replay.head={section.head!r}: name one of the checkpoint's dataset heads {heads}")
        spec = checkpoint.config.head(section.head)
        if section.targets and list(section.targets) != list(spec.targets):
            raise ConfigError(f"replay.targets {section.targets}: the head {spec.name!r} was trained on {spec.targets}")
        return spec
    if section.head:
        raise ConfigError(f"replay.head={section.head!r}: the checkpoint has no per-dataset heads; leave replay.head "
                          f"empty to replay with its own head")
    config = checkpoint.config
    if config.energy:  # its energy head (a multi-task checkpoint's property outputs are not replayed)
        return HeadSpec(SINGLE_HEAD, energy=True, targets=list(section.targets or ["energy"]))
    targets = list(section.targets or config.target_names)
    if targets != list(config.target_names):
        raise ConfigError(f"replay.targets {targets}: the checkpoint's head predicts {config.target_names}")
    return HeadSpec(SINGLE_HEAD, targets=targets, transforms=dict(config.target_transforms))


def with_replay_head(model: Crystalformer, checkpoint: Crystalformer, spec: HeadSpec) -> Crystalformer:
    """A two-head model: ``model``'s encoder and head (as head :data:`TASK`) and ``checkpoint``'s
    head ``spec`` (its weights, reference energies or standardisation), on ``model``'s device and dtype."""
    config = model.config
    task = HeadSpec(TASK, targets=list(config.target_names), transforms=dict(config.target_transforms))
    mixture_config = CrystalformerConfig.from_dict({**config.to_dict(), "target_names": [], "energy": False,
                                                    "target_transforms": {}, "heads": [dataclasses.asdict(task),
                                                                                       dataclasses.asdict(spec)]})
    param = model.embedding.weight
    mixture = Crystalformer(mixture_config).to(device=param.device, dtype=param.dtype)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("embedding.", "blocks."))}
    own = model.state_dict()
    state.update({f"heads.{TASK}.{k}": own[k] for k in mixture.heads[TASK].state_dict()})
    source = checkpoint.heads[spec.name] if checkpoint.config.heads else checkpoint
    theirs = source.state_dict()
    wanted = mixture.heads[spec.name].state_dict()
    copied = {k: theirs[k] for k in wanted if k in theirs and theirs[k].shape == wanted[k].shape}
    lacking = [k for k, v in wanted.items() if k not in copied and v.numel()]
    if lacking:
        raise ConfigError(f"replay: the checkpoint's head {spec.name!r} lacks {lacking}")
    state.update({f"heads.{spec.name}.{k}": v for k, v in copied.items()})
    missing, unexpected = mixture.load_state_dict(state, strict=False)
    sizes = {k: v.numel() for k, v in mixture.state_dict().items()}
    assert not unexpected and not [k for k in missing if sizes[k]], (missing, unexpected)
    return mixture.train(model.training)


def replay_objective(spec: HeadSpec, section) -> Objective:
    if spec.energy:
        return EnergyObjective(section.loss, dataset=spec.name)
    return PropertyObjective(spec.targets, spec.transforms, dataset=spec.name)


def replay_steps(files: list[tuple[str, int]], reader: RowGroupReader, *, seed: int, epoch: int, rows: int,
                 steps: int, rank: int, world: int, window: int, lanes: int) -> Iterator[pa.Table]:
    """Rank ``rank``'s share of the replay rows of each of the task epoch ``epoch``'s ``steps`` steps:
    ``rows`` rows per step from the replay split's stream, which for task epoch e runs through the
    split's own shuffled passes (e, 0), (e, 1), ... (a function of (seed, e) alone, so a resumed
    run gets the same rows)."""
    def endless() -> Iterator[pa.Table]:
        k = 0
        while True:
            plan = EpochPlan(files, seed=stream_seed(seed, 104729, epoch), epoch=k, window=window, lanes=lanes)
            if not plan.rows:
                raise ValueError("replay: the replay set's train split is empty")
            for j in range(plan.n_windows):
                yield reader.window(plan, j)
            k += 1

    pending: list[pa.Table] = []
    held = 0
    source = endless()
    for _ in range(steps):
        while held < rows:
            table = next(source)
            pending.append(table)
            held += table.num_rows
        table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        lo, hi = rows * rank // world, rows * (rank + 1) // world
        yield table.slice(lo, hi - lo)
        pending, held = [table.slice(rows)], held - rows
