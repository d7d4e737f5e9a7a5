"""The fine-tuning loop, read top to bottom: build -> (epoch: stream -> step -> [SWA]) -> validate
-> best / last checkpoints -> test the best and the SWA model.

Batches come through the same stream and packer as pretraining (:mod:`cfdist.stream`,
:mod:`cfdist.data`), with a structure budget per optimiser step: each epoch is the train split's
stream for (seed, epoch) (shard files permuted, rows shuffled in windows of ``data.shuffle_rows``
drawn from ``data.shuffle_lanes`` places), cut into steps of ``data.batch_size`` structures; each
rank takes its contiguous share of every step and packs it into micro-batches within
``data.max_entries`` / ``max_atoms`` / ``max_structures`` (:class:`cfdist.data.BatchBudget`),
whose gradients add up to the step. The step is :func:`cfdist.run.step.train_step` (the loss is
scaled by the step's global label count, so any packing and any number of ranks give the mean
over the step's labels); validation and the test split go through :mod:`cfdist.run.evaluation`.

What differs from the paper's fixed-size batches (a ``DataLoader`` over a full permutation per
epoch): the order is a windowed shuffle (a full permutation when ``data.shuffle_rows`` covers the
split: set it to the train split's size for the paper's order); ``drop_last`` (the paper's
setting) drops the last partial step, and without it the last step is kept when every rank has a
row in it; every rank reads the whole epoch's stream and keeps its share (fine-tuning sets are
small), so a step holds the same structures whatever the number of ranks. From scratch, the
sigma statistics are set by the first micro-batch of the first step (all ranks' shares: the whole
first step when it is not split).

One process by default (``scaling.num_workers: 0``). With Ray Train workers the same loop runs
under DDP: each rank takes its share of every step, and rank 0 validates and writes checkpoints
(``output_dir`` must be storage all nodes see: a shared path, or ``s3://`` / ``gs://``, where rank 0
uploads each file once complete).

Checkpoints in ``<run_dir>/checkpoints``: ``best.pt`` (portable, lowest validation loss),
``swa.pt`` (portable, the SWA average at the end), ``last.pt`` (full state after every epoch:
model, optimiser, schedule, SWA average, RNG-free epoch counter; ``init_from=resume`` continues
from it exactly, since an epoch's stream depends only on (seed, epoch)). A SIGTERM / Ctrl-C
(:mod:`cfdist.run.preempt`, all-reduced with the step's label counts) saves ``last.pt`` at the next
step boundary, mid-epoch (``epoch_step``: the resumed run skips the epoch's first steps), and stops.

A step whose loss or gradients are not finite on any rank is skipped (no optimiser, schedule or SWA
update; :mod:`cfdist.run.badsteps`), counted in ``bad_steps``; ``max_bad_steps`` in a row stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from cfdist import storage
from cfdist.checkpoint import load, load_checkpoint_file, save_portable
from cfdist.compile import compile_model, describe
from cfdist.config import CrystalformerConfig
from cfdist.data import BatchBudget, pack_rows, training_columns
from cfdist.fileio import atomic_write, write_json_atomic
from cfdist.finetune.config import FinetuneConfig, finetune_config_from_dict
from cfdist.manifest import ShardSet
from cfdist.model import Crystalformer, distributed_sum
from cfdist.run import evaluation
from cfdist.run.badsteps import BadStepGuard, local_bad
from cfdist.run.metrics import ComponentWindow, MetricLogger, StepWindow, peak_memory_mb
from cfdist.finetune.replay import TASK, replay_objective, replay_spec, replay_steps, with_replay_head
from cfdist.run.objective import MixtureObjective, PropertyObjective, set_target_normalisation, target_stats
from cfdist.run.optim import lr_factor, parameter_groups
from cfdist.run.preempt import StopRequest, signal_name, stop_on_signals, watch_board
from cfdist.run.runinfo import CONTINUED_FILES, pull_run_files, push_run_files
from cfdist.run.step import train_step
from cfdist.run.tracking import TRACKING_FILE, Tracker
from cfdist.run.transfer import freeze, model_from_pretrained
from cfdist.shards import collate_arrow, read_schema, read_shard
from cfdist.stream import EpochPlan, Position, Prefetcher, RowGroupReader

LAST, BEST, SWA = "last.pt", "best.pt", "swa.pt"


class StepRows:
    """A step's rows with replay: the task's (``task``) and the replay set's (``replay``)."""

    def __init__(self, task: pa.Table, replay: pa.Table):
        self.task, self.replay = task, replay

    @property
    def num_rows(self) -> int:
        return self.task.num_rows + self.replay.num_rows


def steps_per_epoch(n_rows: int, batch_size: int, drop_last: bool, world: int = 1) -> int:
    """Optimiser steps of an epoch over ``n_rows`` structures: ``n_rows // batch_size``, plus the
    last partial step without ``drop_last`` when it gives every one of ``world`` ranks a row."""
    full, rest = divmod(n_rows, batch_size)
    return full + (1 if rest and not drop_last and rest >= world else 0)


def rank_share(step_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a step's ``step_rows`` rows that ``rank`` of ``world`` trains on."""
    return step_rows * rank // world, step_rows * (rank + 1) // world


def epoch_steps(plan: EpochPlan, reader: RowGroupReader, batch_size: int, steps: int, rank: int = 0,
                world: int = 1) -> Iterator[tuple[pa.Table, Position]]:
    """Rank ``rank``'s share of each of the epoch's first ``steps`` steps of ``batch_size`` rows
    (``plan``: the whole split's stream, one reader for all ranks), with the step's position."""
    pending: list[pa.Table] = []
    held = 0
    step = 0
    for j in range(plan.n_windows):
        if step == steps:
            return
        window = reader.window(plan, j)
        pending.append(window)
        held += window.num_rows
        while held >= batch_size and step < steps:
            table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            lo, hi = rank_share(batch_size, rank, world)
            yield table.slice(lo, hi - lo), Position(step + 1, 0)
            pending, held, step = [table.slice(batch_size)], held - batch_size, step + 1
    if step < steps and held:  # the last, partial step (kept without drop_last)
        table = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
        lo, hi = rank_share(table.num_rows, rank, world)
        yield table.slice(lo, hi - lo), Position(step + 1, 0)


def resume_config(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict]:
    """(the run's saved config marked ``init_from=resume``, the saved state) for ``cfg``'s run.

    A run continues with the settings it started with: everything but ``init_from`` comes from
    ``last.pt`` (differences in ``cfg`` are reported and ignored).
    """

    path = storage.join(cfg.run_location(), "checkpoints", LAST)
    if not storage.is_file(path):
        raise FileNotFoundError(f"init_from=resume: no {path} (the run has not finished an epoch yet)")
    # on object storage: a copy in the user cache, keyed by the object's ETag (every rank reads it)
    state = load_checkpoint_file(storage.cached_copy(path, "checkpoints"))
    saved = {**state["config"], "init_from": "resume", "overwrite": False}
    given = cfg.to_dict()
    given["data"]["shards"] = storage.absolute(cfg.data.shards) if cfg.data.shards else ""
    skip = {"init_from", "overwrite", "checkpoint"} | ({"model"} if isinstance(cfg.model, str) else set())
    ignored = sorted(k for k in _flatten(saved) if k not in skip and _flatten(given).get(k) != _flatten(saved)[k])
    if ignored:
        print(f"resuming {cfg.run_name} with its saved settings; ignoring different {', '.join(ignored)}", flush=True)
    return finetune_config_from_dict(saved), state


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "model":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class FinetuneTrainer:
    """One rank of a fine-tuning run; ``run()`` returns the results dict (also ``results.json``)."""

    def __init__(self, cfg: FinetuneConfig, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 report=None, resume_state: dict | None = None):
        """With ``init_from=resume`` the run's saved config and ``last.pt`` replace ``cfg`` unless the
        caller passes ``resume_state`` (then ``cfg`` is already the effective config:
        :func:`cfdist.finetune.driver.prepare` reads both once)."""
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.resume_state = resume_state
        self.device = torch.device(device)
        self.report = report  # called with epoch metrics (Ray Train's report when under Ray)
        self.run_dir = cfg.run_dir()  # output_dir on object storage: a staging directory, uploaded
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- setup ---------------------------------------------------------------------------
    def build(self) -> None:
        state, self.resume_state = self.resume_state, None
        if self.cfg.init_from == "resume" and state is None:  # not read by the driver: read it here, once
            self.cfg, state = resume_config(self.cfg)
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # same initial head on every rank
        self.shards = ShardSet(cfg.data.shards)
        targets = list(cfg.data.targets)
        transforms = cfg.model_config().target_transforms
        self.objective = PropertyObjective(targets, transforms)
        self.budget = BatchBudget(cfg.data.max_entries, cfg.data.max_atoms, cfg.data.max_structures)
        self.train_files = [(e.path, e.rows) for e in self.shards.files(cfg.data.train_split)]
        self.n_train = sum(rows for _, rows in self.train_files)
        self.columns = training_columns(read_schema(self.train_files[0][0]), targets)
        stats = target_stats(self.shards, targets, cfg.data.train_split, transforms)
        self.transfer_report: dict[str, Any] = {"init_from": cfg.init_from}
        if state is not None:  # weights come from last.pt; the architecture from the run itself
            model = Crystalformer(CrystalformerConfig.from_dict(state["model_config"]))
        elif cfg.init_from == "pretrained":
            model, report = model_from_pretrained(cfg.checkpoint, targets, cfg.transfer.head, stats, transforms)
            self.transfer_report.update(report)
        else:
            model = Crystalformer(cfg.model_config())
            set_target_normalisation(model, stats)
        if model.cutoff > self.shards.cutoff + 1e-9:
            raise ValueError(f"{cfg.data.shards}: tables built with cutoff {self.shards.cutoff:.4f} A but the model "
                             f"needs {model.cutoff:.4f} A; re-run preprocessing with --cutoff {model.cutoff:.4f}")
        self.replay = None
        if cfg.replay.enabled:
            model = self.add_replay(model, targets, transforms, resumed=state is not None)
        self.transfer_report["frozen"] = freeze(model, embedding=cfg.transfer.freeze_embedding,
                                                blocks=cfg.transfer.freeze_blocks)
        self.model = model.to(self.device)
        if state is None and cfg.init_from == "scratch":
            # a new model's sigma statistics come from an explicit pass over this rank's first
            # micro-batch of the first step (pooled over ranks), before compiling / DDP; a
            # pretrained or resumed model has its checkpoint's
            self.model.fit_sigma_statistics(self.first_micro_batch(), distributed_sum)
        if cfg.compute.compile:  # a run setting: also for pretrained / resumed models
            compile_model(self.model)  # in place (cfdist.compile): DDP, SWA copies and checkpoints see the model
            if self.rank == 0:
                print(describe(self.model), flush=True)
        self.ddp = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # statistics buffers are set identically on every rank (all-reduced), no need to broadcast
            self.ddp = DistributedDataParallel(self.model, broadcast_buffers=False)
        groups = parameter_groups(self.model, cfg.optim.weight_decay, scaled_blocks=cfg.transfer.lr_scale_blocks,
                                  lr_scale=cfg.transfer.lr_scale, layer_decay=cfg.optim.layer_decay)
        for group in groups:
            group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
        if cfg.data.batch_size < self.world:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is smaller than the {self.world} workers")
        self.steps_per_epoch = steps_per_epoch(self.n_train, cfg.data.batch_size, cfg.data.drop_last, self.world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"train split has {self.n_train} structures, fewer than batch_size="
                             f"{cfg.data.batch_size} with drop_last; lower data.batch_size")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg.optim, self.total_steps))
        self.swa: AveragedModel | None = None
        self.epoch, self.step, self.best_val, self.best_epoch = 0, 0, math.inf, -1
        self.epoch_step = 0  # steps taken in the current epoch (a preempted run saves mid-epoch)
        self.guard = BadStepGuard(cfg.max_bad_steps, self.rank)
        self.stopped: dict[str, Any] = {}
        self.micro_batches = 0  # packed micro-batches this process trained on (all its steps)
        if state is not None:
            self.restore(state)
        if self.rank == 0 and cfg.remote:  # on whichever node rank 0 runs: the stored files it continues
            pull_run_files(self.run_dir, cfg.run_location(),
                           CONTINUED_FILES + ((f"checkpoints/{BEST}",) if state is not None else ()))

    def publish(self, *names: str) -> None:
        """Upload these complete files of the run (relative paths) to its location on object storage
        (rank 0; nothing to do for a local run)."""
        if self.rank == 0 and self.cfg.remote:
            push_run_files(self.run_dir, self.cfg.run_location(), names, tensorboard=False)

    def add_replay(self, model: Crystalformer, targets, transforms, resumed: bool) -> Crystalformer:
        """The two-head model of a run with replay (:mod:`cfdist.finetune.replay`), its objective and
        the replay set's reading; ``model`` is the task's model, or when ``resumed`` already both heads."""
        cfg = self.cfg
        if not resumed:
            checkpoint = load(cfg.checkpoint)
            spec = replay_spec(checkpoint, cfg.replay)
            model = with_replay_head(model, checkpoint, spec)
            self.transfer_report["replay"] = {"shards": str(cfg.replay.shards), "head": spec.name,
                                              "targets": list(spec.targets), "fraction": cfg.replay.fraction}
        spec = next(h for h in model.config.heads if h.name != TASK)
        shards = ShardSet(cfg.replay.shards)
        if model.cutoff > shards.cutoff + 1e-9:
            raise ValueError(f"replay.shards={cfg.replay.shards}: tables built with cutoff {shards.cutoff:.4f} A but "
                             f"the model needs {model.cutoff:.4f} A")
        files = [(e.path, e.rows) for e in shards.files(cfg.data.train_split)]
        if not files:
            raise ValueError(f"replay.shards={cfg.replay.shards}: no {cfg.data.train_split!r} split")
        replay = replay_objective(spec, cfg.replay)
        forces, stress = getattr(replay, "forces", False), getattr(replay, "stress", False)
        self.objective = MixtureObjective({TASK: PropertyObjective(targets, transforms, dataset=TASK), spec.name: replay})
        rows = max(self.world, round(cfg.replay.fraction * cfg.data.batch_size))
        self.replay = {"spec": spec, "shards": shards, "files": files, "rows": rows, "forces": forces,
                       "stress": stress,
                       "columns": training_columns(read_schema(files[0][0]), spec.targets, forces=forces, stress=stress)}
        if self.rank == 0:
            print(f"replay: {rows} structures of {cfg.replay.shards} per step through the pretrained head "
                  f"{spec.name!r} ({'energy' if spec.energy else spec.targets})", flush=True)
        return model

    def eval_objective(self, model) -> PropertyObjective:
        """The task's objective for ``model``: through its task head when it has per-dataset heads
        (trained with replay), else its own."""
        targets, transforms = list(self.cfg.data.targets), self.cfg.model_config().target_transforms
        return PropertyObjective(targets, transforms, dataset=TASK if model.config.heads else None)

    def portable(self, model) -> Crystalformer:
        """What a portable checkpoint holds: the task's single-dataset model."""
        return model.for_dataset(TASK) if model.config.heads else model

    def plan(self, epoch: int) -> EpochPlan:
        """The train split's stream in ``epoch`` (the whole split: every rank takes its share of each step)."""
        d = self.cfg.data
        return EpochPlan(self.train_files, seed=self.cfg.seed, epoch=epoch, window=d.shuffle_rows,
                         lanes=d.shuffle_lanes, shuffle_files=d.shuffle_files)

    def train_stream(self) -> Prefetcher:
        """This rank's steps from the current epoch on, each a list of host micro-batches, prepared
        ahead in a thread (:class:`cfdist.stream.Prefetcher`)."""
        reader = RowGroupReader(self.columns, cache=self.cfg.data.shuffle_lanes + 2)

        first, skip = self.epoch, self.epoch_step

        replay_reader = RowGroupReader(self.replay["columns"], cache=self.cfg.data.shuffle_lanes + 2) \
            if self.replay else None

        def epoch(e: int, _start: Position):
            steps = epoch_steps(self.plan(e), reader, self.cfg.data.batch_size, self.steps_per_epoch,
                                self.rank, self.world)
            if self.replay:  # every step: the task's rows and the replay rows (a function of (seed, e))
                d = self.cfg.data
                extra = replay_steps(self.replay["files"], replay_reader, seed=self.cfg.seed, epoch=e,
                                     rows=self.replay["rows"], steps=self.steps_per_epoch, rank=self.rank,
                                     world=self.world, window=d.shuffle_rows, lanes=d.shuffle_lanes)
                steps = ((StepRows(task, more), position) for (task, position), more in zip(steps, extra))
            # a run saved mid-epoch (preempted) goes on after the steps it took: the epoch's stream
            # depends only on (seed, epoch), so skipping them gives exactly the steps it had left
            return itertools.islice(steps, skip, None) if e == first and skip else steps

        return Prefetcher(epoch, self.prepare_step, first_epoch=self.epoch, depth=self.cfg.data.prefetch_batches)

    def prepare_step(self, table) -> list:
        """This rank's share of a step (Arrow rows) -> its host micro-batches, packed within the budget
        (with replay: the task's micro-batches for its head, then the replay set's for its)."""
        width = self.cfg.compute.entry_chunk
        if isinstance(table, StepRows):
            r = self.replay
            task = [dataclasses.replace(b, dataset=TASK) for b in self.prepare_step(table.task)]
            return task + [dataclasses.replace(collate_arrow(t, list(r["spec"].targets), cutoff=r["shards"].cutoff,
                                                             forces=r["forces"], stress=r["stress"], block_width=width),
                                               dataset=r["spec"].name)
                           for t in pack_rows([table.replay], self.budget)]
        return [collate_arrow(t, list(self.cfg.data.targets), cutoff=self.shards.cutoff,
                              block_width=width) for t in pack_rows([table], self.budget)]

    def first_micro_batch(self):
        """This rank's first micro-batch of the first step (on the device), or None when it has none."""
        reader = RowGroupReader(self.columns, cache=self.cfg.data.shuffle_lanes + 2)
        for table, _ in epoch_steps(self.plan(0), reader, self.cfg.data.batch_size, 1, self.rank, self.world):
            micro_batches = self.prepare_step(table)
            return micro_batches[0].to(self.device) if micro_batches else None
        return None

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.cpu().tolist()

    def restore(self, state: dict) -> None:
        """Continue from a ``last.pt`` state (model, optimiser, schedule, SWA average, counters)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["swa"] is not None:
            self.swa = AveragedModel(self.model)
            self.swa.load_state_dict(state["swa"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.epoch_step = state.get("epoch_step", 0)
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.transfer_report = state["transfer_report"]
        if self.rank == 0:
            where = f"{self.epoch_step} steps into epoch {self.epoch + 1}" if self.epoch_step else f"after epoch {self.epoch}"
            last = storage.join(self.cfg.run_location(), "checkpoints", LAST)
            print(f"resumed {last} {where} (step {self.step}, best val loss {self.best_val:.4g} "
                  f"at epoch {self.best_epoch})", flush=True)

    # -- training ------------------------------------------------------------------------
    def run(self) -> dict:
        self.build()
        cfg = self.cfg
        tracker = (Tracker(cfg.tracking, self.run_dir, cfg.to_dict(), cfg.run_name) if self.rank == 0 else None)
        logger = MetricLogger(self.run_dir, self.rank == 0, self.total_steps, self.step, tracker=tracker)
        status = "FAILED"
        window, components = StepWindow(), ComponentWindow(self.objective)
        stream = self.train_stream()
        try:
            while self.epoch < cfg.epochs and not self.stopped:
                swa_phase = cfg.swa_epochs > 0 and self.epoch >= cfg.epochs - cfg.swa_epochs
                while (item := stream.next()).batch is not None:
                    if item.epoch != self.epoch:
                        raise RuntimeError(f"rank {self.rank}: stream at epoch {item.epoch}, loop at {self.epoch}")
                    outcome, grad_norm = self.optimiser_step(item.batch, window, components)
                    if outcome == "stop":  # every rank saw the request at this step boundary
                        self.stop(logger)
                        break
                    self.step += 1
                    self.epoch_step += 1
                    if outcome == "bad":  # skipped: no schedule or SWA step either (weights unchanged)
                        pass
                    elif swa_phase:  # paper: average after every step of the last epochs, lr held
                        if self.swa is None:
                            self.swa = AveragedModel(self.model)
                        self.swa.update_parameters(self.model)
                    else:
                        self.scheduler.step()
                    window.steps += 1
                    if self.step % cfg.log_every == 0:
                        logger.log(self.step, self.window_metrics(window, components, grad_norm))
                        window, components = StepWindow(), ComponentWindow(self.objective)
                if self.stopped:
                    break
                self.epoch += 1
                self.epoch_step = 0
                record = {"epoch": self.epoch, "swa": swa_phase}
                if self.rank == 0:
                    new_best = ()
                    if cfg.data.val_split:
                        val = self.validate(self.model)
                        record.update(val)
                        if val["val_loss"] < self.best_val:  # NaN (no labels) never selects
                            self.best_val, self.best_epoch = val["val_loss"], self.epoch
                            save_portable(self.ckpt_dir / BEST, self.portable(self.model), extra=self.extra("best"))
                            new_best = (f"checkpoints/{BEST}",)
                    self.save_last()
                    logger.log(self.step, record)
                    # best.pt before last.pt, which names it: a resume never finds last.pt without it
                    self.publish(*new_best, f"checkpoints/{LAST}", "metrics.jsonl", TRACKING_FILE)
                if self.report is not None:
                    self.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
            if self.stopped:
                status = "KILLED"  # the resumed run reopens the tracked run
                return dict(self.stopped)
            results = self.finish() if self.rank == 0 else {}
            if tracker is not None:
                tracker.log_files([p for p in (self.ckpt_dir / n for n in ("final.pt", BEST, SWA)) if p.is_file()]
                                  + [self.run_dir / "results.json"])
            status = "FINISHED"
            return results
        finally:
            stream.close()
            logger.close(status)
            if self.rank == 0 and cfg.remote and status != "FAILED":
                # the rest of the run, now complete and closed: checkpoints, results, TensorBoard, the
                # tracker's offline files (ray/: Ray Train's own driver-side state, not the run's)
                storage.upload_tree(self.run_dir, cfg.run_location(), skip=("ray",))

    def stop(self, logger: MetricLogger) -> None:
        """A stop request reached every rank at a step boundary: rank 0 saves ``last.pt`` here
        (mid-epoch), every rank returns."""
        signum = StopRequest.get()
        name = signal_name(signum) if signum else "a signal to another rank"
        last = storage.join(self.cfg.run_location(), "checkpoints", LAST)
        self.stopped = {"preempted": 1, "preempted_by": name, "step": self.step, "checkpoint": str(last)}
        if self.rank == 0:
            self.save_last()
            logger.log(self.step, {"preempted": 1, "epoch": self.epoch, "epoch_step": self.epoch_step})
            self.publish(f"checkpoints/{LAST}", "metrics.jsonl")
            print(f"stopped by {name} at step {self.step} (epoch {self.epoch + 1}, {self.epoch_step} steps into it): "
                  f"checkpoint {last}; resume with init_from=resume", flush=True)
        if self.report is not None:
            self.report({"preempted": 1, "step": self.step})

    def optimiser_step(self, micro_batches: list, window: StepWindow,
                       components: ComponentWindow) -> tuple[str, torch.Tensor | None]:
        """One optimiser step on this rank's share of the step (host micro-batches) ->
        (``"ok"`` | ``"bad"`` (skipped: non-finite) | ``"stop"`` (not taken: stop requested), grad norm).

        The step's label count over all ranks scales the loss (one small all-reduce per step, which
        also carries the stop request); the pre-clip gradient norm stays on the device. The
        finiteness check before the update waits for the device once per step.
        """
        self.ddp.train()
        t0 = time.perf_counter()
        counts = [sum(c) for c in zip(*(self.objective.label_counts(b) for b in micro_batches))]
        *global_counts, stop = self.all_sum(counts + [float(StopRequest.get())])
        if stop:
            return "stop", None
        batches = [b.to(self.device) for b in micro_batches]
        t_data = time.perf_counter() - t0
        self.optimizer.zero_grad(set_to_none=True)
        results = []
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1  # DDP averages gradients once, at the step's last micro-batch
            context = self.ddp.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
            with context:
                results.append(train_step(self.ddp, batch, self.objective, global_counts, self.world))
            window.add(batch, t_data if k == 0 else 0.0)
        self.micro_batches += len(batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        bad = local_bad([r.loss_share for r in results], params)
        if self.all_sum([float(bad)])[0]:  # on any rank: skipped on all of them
            self.optimizer.zero_grad(set_to_none=True)
            self.guard.skipped(self.step + 1, [i for b in batches for i in b.ids])
            return "bad", None
        self.guard.good()
        for k, result in enumerate(results):
            components.add(result.sums, result.loss_share, new_step=k == 0)  # one loss per step
        # pre-clip total norm; max_norm=inf measures without clipping when clipping is off
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip or math.inf)
        self.optimizer.step()
        return "ok", grad_norm

    def window_metrics(self, w: StepWindow, components: ComponentWindow, grad_norm: torch.Tensor) -> dict:
        values = w.values()
        totals = self.all_sum(values + components.values())  # every rank logs at the same steps
        out = {**w.summary(self.world, totals[:len(values)]),
               **components.summary(totals[len(values):], "", train=True),
               "lr": float(self.optimizer.param_groups[0]["lr"]),
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "epoch": self.epoch, "peak_memory_mb": peak_memory_mb(self.device), "bad_steps": self.guard.total}
        if not components.micro_steps:  # every step of the window was skipped (bad): no loss to show
            out.pop("loss", None)
        return out

    # -- evaluation and checkpoints ------------------------------------------------------
    def evaluate(self, model, split: str):
        """Summed stats of ``model`` on ``split`` (this process reads the whole split)."""
        batches = evaluation.split_batches(self.shards, split, list(self.cfg.data.targets), self.budget,
                                            block_width=self.cfg.compute.entry_chunk)
        return evaluation.evaluate(model, batches, self.eval_objective(model), self.device)

    def validate(self, model) -> dict:
        """``val_loss`` (normalised L1, the selection criterion) and ``val_mae/<target>`` (original units)."""
        return evaluation.metrics(self.eval_objective(model), self.evaluate(model, self.cfg.data.val_split), "val_")

    def extra(self, kind: str) -> dict:
        return {"kind": kind, "epoch": self.epoch, "step": self.step, "run_name": self.cfg.run_name,
                "targets": list(self.cfg.data.targets), "init_from": self.transfer_report["init_from"],
                "pretrained_from": self.transfer_report.get("checkpoint"), "shards": str(self.cfg.data.shards)}

    def swa_model(self):
        """The SWA average as a plain model (statistics buffers from the trained model)."""
        model = self.swa.module
        with torch.no_grad():
            for name, buf in self.model.named_buffers():
                model.get_buffer(name).copy_(buf)
        return model

    def save_last(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "swa": self.swa.state_dict() if self.swa else None,
                 "epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step, "best_val": self.best_val,
                 "best_epoch": self.best_epoch,
                 "transfer_report": self.transfer_report, "config": self.cfg.to_dict(),
                 "model_config": self.model.config.to_dict()}
        with atomic_write(self.ckpt_dir / LAST) as tmp:
            torch.save(state, tmp)

    def finish(self) -> dict:
        """Save the SWA model, evaluate best / SWA / final on the test split, write results.json."""
        cfg = self.cfg
        models = {"final": self.model}
        if self.swa is not None:
            models["swa"] = self.portable(self.swa_model())
            save_portable(self.ckpt_dir / SWA, models["swa"], extra=self.extra("swa"))
        if (self.ckpt_dir / BEST).is_file():
            models["best"] = load(self.ckpt_dir / BEST, map_location=self.device)
        save_portable(self.ckpt_dir / "final.pt", self.portable(self.model), extra=self.extra("final"))
        results: dict[str, Any] = {"run_dir": str(self.run_dir), "epochs": self.epoch, "steps": self.step,
                                   "steps_per_epoch": self.steps_per_epoch, "best_epoch": self.best_epoch,
                                   "best_val_loss": self.best_val, "transfer": self.transfer_report,
                                   "n_train": self.n_train, "micro_batches": self.micro_batches,
                                   "targets": list(cfg.data.targets)}
        if cfg.data.val_split:
            results["val"] = {name: self.validate(m) for name, m in models.items()}
        test = cfg.data.test_split
        if test and self.shards.files(test):
            # the same numbers as ``cfdist evaluate --split test`` on the saved checkpoints
            results["test"] = {name: evaluation.target_report(self.eval_objective(model), self.evaluate(model, test))
                               for name, model in models.items()}
            results["test"]["train_mean"] = self.train_mean_baseline(test)
        write_json_atomic(self.run_dir / "results.json", results)
        return results

    def train_mean_baseline(self, split: str) -> dict:
        """MAE on ``split`` of predicting the train mean of each target (the trivial baseline; in
        log10 units for a ``log`` target, as its metrics are)."""
        out = {}
        files = [e.path for e in self.shards.files(split)]
        transforms = self.model.config.target_transforms
        stats = target_stats(self.shards, self.cfg.data.targets, self.cfg.data.train_split, transforms)
        for name in self.cfg.data.targets:
            y = np.concatenate([read_shard(p, [f"y.{name}"]).column(0).to_numpy(zero_copy_only=False)
                                for p in files]).astype(np.float64)
            y = y[np.isfinite(y)]
            if transforms.get(name) == "log":
                y = np.log10(y[y > 0])
            mean, _ = stats[name]
            out[name] = {"n": int(len(y)), "mae": float(np.abs(y - mean).mean()) if len(y) else None}
        return out


# ----------------------------------------------------------------------------- entry points
def local_finetune(cfg: FinetuneConfig, resume_state: dict | None = None) -> dict:
    """Fine-tune in this process (``cfg``: the effective config, see :func:`cfdist.finetune.driver.prepare`)."""
    if cfg.scaling.threads > 0:
        torch.set_num_threads(cfg.scaling.threads)
    device = "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    with stop_on_signals():  # SIGTERM / Ctrl-C: last.pt at the next step boundary, then stop
        return FinetuneTrainer(cfg, device=device, resume_state=resume_state).run()


def ray_finetune_loop(loop_config: dict) -> None:
    """``train_loop_per_worker`` for Ray Train (DDP over the worker group)."""
    import ray.train
    import ray.train.torch

    cfg = finetune_config_from_dict(loop_config["config"])
    watch_board(loop_config.get("stop_board", ""))  # the driver's SIGTERM / Ctrl-C reaches this worker
    if cfg.scaling.threads > 0:
        torch.set_num_threads(cfg.scaling.threads)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    trainer = FinetuneTrainer(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device,
                              report=lambda m: ray.train.report(m))
    trainer.run()
    if dist.is_initialized():
        dist.barrier()
