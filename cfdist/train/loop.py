"""The training loop, read top to bottom: restore -> (stream -> pack -> step -> log/validate/checkpoint).

It runs inside Ray Train workers (:func:`ray_train_loop`, launched by :mod:`cfdist.train.driver`)
or in plain processes (:func:`local_train_loop`: one process, or torchrun ranks), and differs
between the two only in the :class:`WorkerContext` (where rows come from, where checkpoints go).

The step itself (forward, loss, backward) is :func:`cfdist.run.step.train_step` with the run's
objective (:func:`cfdist.run.objective.make_objective`); validation is
:func:`cfdist.run.evaluation.evaluate` (the same numbers as fine-tuning and ``cfdist evaluate``).

Lockstep: every micro-step all ranks all-reduce ``[has_batch, labels per component]``. An epoch ends for
everyone as soon as one rank's stream is exhausted (ranks with a few batches left drop them,
counted in ``dropped_tail``), so collectives never hang on uneven packing. The loss is the sum
of a rank's L1 errors times world / global label count, so after DeepSpeed's gradient averaging
the gradient is that of the mean over all labelled structures of the step, however unevenly the
packed batches are sized.

Energy models (``model.energy``): the forward returns energies and, when the ``loss`` section
weights them, forces and stress (by autograd, the graph kept for the double backward). The loss
is w_E L(E / N) + w_F L(F) + w_S L(sigma) (:class:`cfdist.train.config.LossSection`), each term a
rank's summed elementwise loss times world / the step's global label count of that component
(structures, force components, stress components; all-reduced with ``has_batch``), so the
gradient is again that of the global mean per component. Whether forces / stress are computed is
fixed by the config, never by a batch's labels, so every rank runs the same passes and collectives
(under ZeRO-3 the parameters are gathered for the whole micro-step:
:func:`cfdist.train.engine.zero3_parameters_held`). Per-element reference energies are fitted on
the train split at the start (:func:`cfdist.run.objective.fit_element_energies`, rank 0,
broadcast) unless the run resumes or starts from an energy checkpoint (``init_from``); they and
the energy scale are saved in every checkpoint (float64, exact).

Data: every rank reads its own block of the train split straight from the shard files
(:mod:`cfdist.stream`: file order and windows shuffled per epoch, packing and collation in a
prefetch thread that runs on into the next epoch). Resume: checkpoints are taken at optimiser-step
boundaries and store a :class:`cfdist.stream.DataCursor` (epoch, micro-batches consumed, every
rank's stream position); a restored rank reads on from its position, so a resumed run continues
with exactly the batches an uninterrupted one would have used, at a cost that does not depend on
how far into the epoch it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from cfdist import storage
from cfdist.checkpoint import DEEPSPEED_TAG, STATE_FILE
from cfdist.cluster import quiet_ray_data
from cfdist.compile import compile_model, describe
from cfdist.data import BatchBudget, training_columns
from cfdist.fileio import write_json_atomic
from cfdist.manifest import ShardSet
from cfdist.model import Crystalformer, distributed_sum
from cfdist.preprocess.element_fit import ElementFitSums
from cfdist.preprocess.element_fit import solve as solve_element_fit
from cfdist.run import evaluation
from cfdist.run.badsteps import BadStepGuard, local_bad
from cfdist.run.metrics import ComponentWindow, MetricLogger, StepWindow, peak_memory_mb
from cfdist.run.objective import fit_element_energies, make_objective, set_target_normalisation, target_stats
from cfdist.run.runinfo import push_run_files
from cfdist.run.preempt import StopRequest, signal_name, stop_on_signals, watch_board
from cfdist.run.step import train_step
from cfdist.run.tracking import Tracker
from cfdist.run.transfer import init_from_checkpoint
from cfdist.shards import collate_arrow, read_schema
from cfdist.mixture import MixturePosition, MixtureRows, mixture_batches
from cfdist.stream import DataCursor, EpochPlan, Position, Prefetcher, RowGroupReader, epoch_batches, stream_seed
from cfdist.train.config import PretrainConfig, config_from_dict
from cfdist.train.datasets import DatasetSource, mixture_sources, mixture_weights
from cfdist.train.engine import build_engine, init_distributed, skip_step, zero3_parameters_held


# ----------------------------------------------------------------------------- worker contexts
class WorkerContext:
    """Where this rank runs, its rows and where its checkpoints go.

    Every rank reads its own rows straight from the shard files (:mod:`cfdist.stream`): the
    epoch plan gives each rank a balanced, disjoint block, shuffled per epoch, and a position that
    resumes exactly. (Ray Data's streaming split cannot resume at a position and restarts its
    pipeline every epoch; docs/scaling.md.)
    """

    rank: int
    world_size: int
    backend: str
    device: torch.device
    cfg: PretrainConfig
    columns: list[str]
    shards: ShardSet

    def plan(self, split: str, epoch: int, *, shuffle: bool) -> EpochPlan:
        d = self.cfg.data
        files = [(e.path, e.rows) for e in self.shards.files(split)]
        return EpochPlan(files, seed=self.cfg.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                         window=d.shuffle_rows if shuffle else 1, lanes=d.shuffle_lanes if shuffle else 1,
                         shuffle_files=shuffle and d.shuffle_files, shuffle_rows=shuffle)

    def train_stream(self, budget: BatchBudget, prepare: Callable, cursor: DataCursor) -> Prefetcher:
        """This rank's batches from ``cursor`` on, epoch after epoch, prepared ahead in a thread."""
        reader = RowGroupReader(self.columns, cache=self.cfg.data.shuffle_lanes + 2)
        start = cursor.start_for(self.rank, self.world_size)

        def epoch(e: int, at: Position):
            return epoch_batches(self.plan(self.cfg.data.train_split, e, shuffle=True), reader, budget, at)

        return Prefetcher(epoch, prepare, first_epoch=cursor.epoch, start=start,
                          depth=self.cfg.data.prefetch_batches)

    def mixture_stream(self, sources: list[DatasetSource], probabilities, prepare: Callable,
                       start: MixturePosition) -> Prefetcher:
        """This rank's mixture stream (:func:`cfdist.mixture.mixture_batches`) from ``start``, prepared
        ahead in a thread; dataset d's own epochs are shuffled with seed (run seed, d)."""
        d = self.cfg.data
        readers = [RowGroupReader(s.columns, cache=d.shuffle_lanes + 2) for s in sources]
        files = [[(e.path, e.rows) for e in s.shards.files(d.train_split)] for s in sources]

        def plan(k: int, epoch: int) -> EpochPlan:
            return EpochPlan(files[k], seed=stream_seed(self.cfg.seed, k), epoch=epoch, rank=self.rank,
                             world_size=self.world_size, window=d.shuffle_rows, lanes=d.shuffle_lanes,
                             shuffle_files=d.shuffle_files, shuffle_rows=True)

        def endless(_epoch: int, at: MixturePosition):
            return mixture_batches(plan, readers, probabilities, [s.budget for s in sources], seed=self.cfg.seed,
                                   rank=self.rank, start=at, names=[s.name for s in sources])

        return Prefetcher(endless, prepare, first_epoch=0, start=start, depth=d.prefetch_batches)

    @contextmanager
    def latest_checkpoint(self):
        yield None

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        """Every rank calls ``write(directory)`` (its DeepSpeed shard + rank 0's state file); the
        context then makes the directory the run's newest checkpoint."""
        raise NotImplementedError

    def checkpoint_location(self, step: int) -> str:
        """Where the checkpoint of ``step`` lives (for messages)."""
        raise NotImplementedError

    def report(self, metrics: dict) -> None:
        """Metrics without a checkpoint, for the driver (all ranks call it)."""


class RayContext(WorkerContext):
    """Inside a Ray Train worker: checkpoints are reported to Ray Train, which persists them."""

    def __init__(self, cfg: PretrainConfig, columns: list[str], shards: ShardSet):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.backend = "nccl" if cfg.scaling.use_gpu else "gloo"
        self.device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
        self.cfg, self.columns, self.shards = cfg, columns, shards

    @contextmanager
    def latest_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        if not self.cfg.remote:
            with checkpoint.as_directory() as path:
                yield Path(path)
            return
        # On object storage, file by file through cfdist.storage rather than Checkpoint.as_directory():
        # arrow's GCS listing reports a "directory" only where a marker object exists, and objects
        # written without markers (gsutil, other tools, the GCS emulator) then fail Ray's download
        # of the nested ds/ folder ("Failed to open local file .../ds/mp_rank_00_model_states.pt").
        with tempfile.TemporaryDirectory(prefix="cfdist-resume-") as tmp:
            yield storage.download_tree(self.cfg.stored_location(checkpoint.path), tmp)

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="cfdist-ckpt-") as tmp:
            write(Path(tmp))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:09d}")
        if self.rank == 0 and self.cfg.remote:  # metrics beside the checkpoints on object storage
            push_run_files(self.cfg.run_dir(), self.cfg.run_location(), ("metrics.jsonl", "tracking.json"))

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)

    def checkpoint_location(self, step: int) -> str:
        # the driver's RunConfig: storage_path=<run location>, name="ray" (cfdist.train.driver.ray_storage)
        return f"{self.cfg.run_location().rstrip('/')}/ray/checkpoint_{step:09d}"


class LocalContext(WorkerContext):
    """Plain processes (single process or torchrun ranks): checkpoints in the run directory."""

    def __init__(self, cfg: PretrainConfig, columns: list[str], shards: ShardSet):
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        use_cuda = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.backend = "nccl" if use_cuda else "gloo"
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        self.cfg, self.columns, self.shards = cfg, columns, shards
        self.checkpoints = cfg.run_dir() / "checkpoints"

    @contextmanager
    def latest_checkpoint(self):
        done = sorted(self.checkpoints.glob("step_*/" + STATE_FILE)) if self.checkpoints.is_dir() else []
        yield done[-1].parent if done else None

    def save_checkpoint(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        # every rank writes its files into one scratch directory (shared here); rank 0 then renames
        # it into place, so a checkpoint directory with a state file is always complete
        scratch = self.checkpoints / f".tmp_step_{step:09d}" / f"step_{step:09d}"
        if self.rank == 0:
            scratch.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        write(scratch)
        dist.barrier()
        if self.rank == 0:
            final = self.checkpoints / scratch.name
            if final.exists():
                shutil.rmtree(final)
            os.replace(scratch, final)
            shutil.rmtree(scratch.parent, ignore_errors=True)
            kept = sorted(self.checkpoints.glob("step_*/" + STATE_FILE))
            for old in kept[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old.parent, ignore_errors=True)
        dist.barrier()

    def checkpoint_location(self, step: int) -> str:
        return str(self.checkpoints / f"step_{step:09d}")


# ----------------------------------------------------------------------------- the loop
class Trainer:
    """One rank's training run; ``run()`` returns the final metrics."""

    def __init__(self, cfg: PretrainConfig, ctx: WorkerContext, shards: ShardSet):
        self.cfg, self.ctx, self.shards = cfg, ctx, shards
        self.targets = list(cfg.data.targets)
        self.model_config = cfg.model_config()
        self.energy = bool(self.model_config.any_energy)
        self.want_forces, self.want_stress = label_columns_wanted(cfg)
        # a mixture (data.datasets): one source per dataset, each with its head and loss
        self.sources: list[DatasetSource] = list(shards) if cfg.data.is_mixture else []
        self.probabilities = mixture_weights(cfg, self.sources) if self.sources else None
        self.objective = make_objective(self.model_config, self.targets, cfg.loss,
                                        losses={d.name: d.loss for d in cfg.data.datasets})
        self.budget = training_budget(cfg)
        self.drawn = np.zeros((2, len(self.sources)))  # per dataset: micro-batches, structures (log window)
        self.grad_norm: float | None = None  # pre-clipping norm, when DeepSpeed does not record it
        self.init_report: dict[str, Any] = {}
        self.guard = BadStepGuard(cfg.max_bad_steps, ctx.rank)
        self.cycle: list = []  # this accumulation cycle's micro-steps: (loss share, sums, ids)
        self.saved_step = -1  # the step of the newest checkpoint this process wrote
        self.stopped: dict[str, Any] = {}  # set when a stop request ended the run
        self.stream: Prefetcher | None = None  # opened by build() for a new run, then read by run()
        self.first_item = None  # a new run's first stream item: fitted the sigma statistics, trained on first

    # -- setup ---------------------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        init_distributed(self.ctx.backend)
        model = Crystalformer(self.model_config)
        if self.sources:  # each property head standardised with its own dataset's statistics
            for source in self.sources:
                head = model.output(source.name)
                set_target_normalisation(head, target_stats(source.shards, head.target_names, cfg.data.train_split,
                                                            source.entry.transforms))
        else:
            set_target_normalisation(model, target_stats(self.shards, model.config.target_names,
                                                         cfg.data.train_split, model.config.target_transforms))
        self.step, self.cursor = 0, DataCursor()
        self.position: Position | MixturePosition = MixturePosition() if self.sources else Position()
        with self.ctx.latest_checkpoint() as path:
            copied_buffers: dict[str, torch.Tensor] = {}
            if path is None and cfg.init_from:  # weights before the engine (it shards / casts them)
                self.init_report, copied_buffers = init_from_checkpoint(model, cfg.init_from, cfg.init_head)
                if self.ctx.rank == 0:
                    print(f"initialised from {cfg.init_from}: {self.init_report}", flush=True)
            model.to(self.ctx.device)
            if path is None and not cfg.init_from:
                # issue 17: a new model's sigma statistics come from an explicit pass over this
                # rank's first training batch (pooled over ranks), before compiling / DeepSpeed;
                # that batch stays the first one trained on (self.first_item, read by run())
                self.stream = self.open_stream()
                self.first_item = self.stream.next()
                first = self.first_item.batch
                model.fit_sigma_statistics(first.to(self.ctx.device) if first is not None else None, distributed_sum)
            if cfg.compute.compile:  # in place, before DeepSpeed wraps it (cfdist.compile)
                compile_model(model)
                if self.ctx.rank == 0:
                    print(describe(model), flush=True)
            self.engine, self.optimizer, self.scheduler = build_engine(
                model, cfg.deepspeed, cfg.optim, cfg.max_steps, cfg.data.max_structures)
            self.model = self.engine.module
            if path is not None:
                self.restore(path)
                return
            # statistics buffers after the engine's precision cast, at full precision
            with torch.no_grad():
                for name, value in copied_buffers.items():
                    buf = self.model.get_buffer(name)
                    buf.copy_(value.to(device=buf.device, dtype=buf.dtype))
            if self.sources:
                for source in self.sources:
                    if source.entry.energy:
                        self.fit_reference_energies(self.model.output(source.name), source.shards,
                                                    source.targets[0], f"dataset {source.name!r}: ")
            elif self.energy and (self.init_report.get("energy_head") != "kept" or cfg.init_references == "refit"):
                # a kept energy head's references are re-fitted on this run's data unless init_references=keep
                self.fit_reference_energies(self.model, self.shards, self.targets[0])

    def open_stream(self) -> Prefetcher:
        """This rank's training stream from the cursor (a mixture's, or the one dataset's)."""
        if not self.sources:
            return self.ctx.train_stream(self.budget, self.prepare_batch, self.cursor)
        return self.ctx.mixture_stream(self.sources, self.probabilities, self.prepare_batch, self.position)

    def fit_reference_energies(self, head, shards: ShardSet, label: str, what: str = "") -> None:
        """Least-squares reference energies on the train split (rank 0) -> every rank's ``head``: solved
        from the sums the preprocessing job wrote into the manifest (no pass over the train split,
        so start-up does not grow with N), or by a pass over it for shards written without them."""
        n = self.model_config.n_elements
        values = torch.zeros(n + 1, dtype=torch.float64)
        if self.ctx.rank == 0:
            t0 = time.perf_counter()
            split = self.cfg.data.train_split
            stored = shards.element_fit(label, split)
            if stored is not None:
                fit = solve_element_fit(ElementFitSums.from_dict(stored), n, label=label)
                source = "the manifest's statistics"
            else:
                fit = fit_element_energies([e.path for e in shards.files(split)], label, n)
                source = "a pass over the train split (the manifest has no element_fit: shards from an older cfdist)"
            values = torch.from_numpy(np.concatenate([fit["element_energy"], [fit["energy_scale"]]]))
            how = ("the residual's" if fit["scale_from"] == "residual"
                   else "fallback: too few structures per element for")
            print(f"{what}reference energies: least squares on {fit['structures']:,} train structures, "
                  f"{len(fit['elements'])} elements, from {source}; per-atom residual std "
                  f"{fit['residual_std']:.4f} eV/atom; energy scale {fit['energy_scale']:.4f} eV/atom ({how} "
                  f"dof-corrected std) ({time.perf_counter() - t0:.2f} s)", flush=True)
        if self.ctx.world_size > 1:
            values = values.to(self.ctx.device) if self.ctx.backend == "nccl" else values
            dist.broadcast(values, src=0)
            values = values.cpu()
        with torch.no_grad():
            head.element_energy.copy_(values[:n].to(head.element_energy.device))
            head.energy_scale.fill_(float(values[n]))

    def restore(self, path: Path) -> None:
        load_path, client = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG)
        if load_path is None:
            raise RuntimeError(f"{path}: DeepSpeed found no checkpoint with tag {DEEPSPEED_TAG!r}")
        state = json.loads((path / STATE_FILE).read_text())
        with torch.no_grad():
            for name, value in state["buffers"].items():  # exact float32 statistics, float64 references
                buf = self.model.get_buffer(name)
                buf.copy_(torch.as_tensor(value, dtype=buf.dtype).reshape(buf.shape))
        self.init_report = state.get("init_from", {})
        self.step, self.cursor = int(client["step"]), DataCursor.from_dict(client["cursor"])
        self.position = self.start_position()
        if self.ctx.rank == 0 and self.sources:
            print(f"resumed from {path} at step {self.step} (mixture: {self.cursor.batches} micro-batches drawn; every "
                  f"dataset reads on where it was)", flush=True)
        elif self.ctx.rank == 0:
            print(f"resumed from {path} at step {self.step} (epoch {self.cursor.epoch}, {self.cursor.batches} "
                  f"batches into it; reading on at window {self.position.window}, row {self.position.offset})",
                  flush=True)

    def start_position(self) -> Position | MixturePosition:
        """Where this rank's stream resumes from the cursor."""
        if not self.sources:
            return self.cursor.start_for(self.ctx.rank, self.ctx.world_size)
        if self.cursor.batches == 0:
            return MixturePosition()
        world = self.ctx.world_size
        if self.cursor.world_size != world or len(self.cursor.mixture) != world:
            raise ValueError(f"the checkpoint was taken with {self.cursor.world_size} workers, this run has {world}: "
                             f"an exact resume of a mixture stream needs the same number")
        values = self.cursor.mixture[self.ctx.rank]
        if len(values) != 3 * len(self.sources):
            raise ValueError(f"the checkpoint's mixture has {len(values) // 3} datasets, this run {len(self.sources)}")
        return MixturePosition.from_values(self.cursor.batches, values)

    # -- helpers -------------------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.ctx.backend == "nccl":
            t = t.to(self.ctx.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def prepare_batch(self, table):
        """Arrow rows -> CrystalBatch on the CPU (runs in the prefetch thread for training); a
        mixture's rows with their dataset's labels, tagged with its name (its head and loss)."""
        if isinstance(table, MixtureRows):
            source = self.sources[table.dataset]
            batch = collate_arrow(table.table, source.targets, cutoff=source.shards.cutoff, forces=source.forces,
                                  stress=source.stress, block_width=self.cfg.compute.entry_chunk)
            return dataclasses.replace(batch, dataset=source.name)
        return collate_arrow(table, self.targets, cutoff=self.shards.cutoff, forces=self.want_forces,
                             stress=self.want_stress, block_width=self.cfg.compute.entry_chunk)

    def label_counts(self, batch) -> list[float]:
        """Labels per component of a host micro-batch (all-reduced with has_batch to scale the loss)."""
        if batch is None:
            return [0.0] * len(self.objective.components)
        return self.objective.label_counts(batch)

    # -- training ------------------------------------------------------------------------
    def run(self) -> dict:
        self.build()
        cfg, ctx = self.cfg, self.ctx
        tracker = Tracker(cfg.tracking, cfg.run_dir(), cfg.to_dict(), cfg.run_name) if ctx.rank == 0 else None
        logger = MetricLogger(cfg.run_dir(), ctx.rank == 0, cfg.max_steps, self.step, tracker=tracker)
        status = "FAILED"
        window, components = StepWindow(), ComponentWindow(self.objective)
        metrics: dict[str, Any] = {}
        dropped_tail = 0
        # build() opened the stream of a new run (its first batch fitted the sigma statistics)
        stream = self.stream or self.open_stream()
        epoch_batches_seen = 0
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                item, self.first_item = (self.first_item or stream.next()), None
                if item.epoch != self.cursor.epoch:
                    raise RuntimeError(f"rank {ctx.rank}: stream at epoch {item.epoch}, cursor at {self.cursor.epoch}")
                counts = self.label_counts(item.batch)  # on the host batch: no device sync
                batch = item.batch.to(ctx.device) if item.batch is not None else None
                t_data = time.perf_counter() - t0
                # the stop request (a signal to any rank) rides on the micro-step's one collective
                have, stop, *labelled = self.all_sum([1.0 if batch is not None else 0.0,
                                                      float(StopRequest.get()), *counts])
                if stop and not self.cycle:  # at an optimiser-step boundary: save here and stop
                    self.stop(StopRequest.get(), metrics)
                    break
                if have < ctx.world_size:  # some rank is out of data: the epoch ends for all
                    if batch is not None:  # drop this rank's tail (counted, not trained on)
                        dropped_tail += batch.n_crystals + stream.skip_epoch(self.cursor.epoch)
                    elif epoch_batches_seen == 0 and self.cursor.batches == 0:
                        raise RuntimeError(f"rank {ctx.rank}: the train split yielded no batches in epoch "
                                           f"{self.cursor.epoch}; use fewer workers than train shard rows")
                    self.cursor = DataCursor(epoch=self.cursor.epoch + 1)
                    self.position, epoch_batches_seen = Position(), 0
                    continue
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.micro_step(batch, labelled, components)
                self.cursor.batches += 1
                self.position, epoch_batches_seen = item.position, epoch_batches_seen + 1
                window.add(batch, t_data)
                if self.sources:
                    k = self.objective.names.index(batch.dataset)
                    self.drawn[:, k] += (1, batch.n_crystals)
                if not boundary:
                    continue
                self.step += 1
                window.steps += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    metrics = self.window_metrics(window, components)
                    metrics["dropped_tail"] = dropped_tail
                    metrics["bad_steps"] = self.guard.total
                    logger.log(self.step, metrics)
                    window, components = StepWindow(), ComponentWindow(self.objective)
                if cfg.data.val_split and (self.step % cfg.val_every == 0 or self.step == cfg.max_steps):
                    val = self.validate()
                    metrics.update(val)
                    logger.log(self.step, val)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.checkpoint(metrics)
            status = "KILLED" if self.stopped else "FINISHED"  # a preempted run is reopened on resume
        finally:
            stream.close()
            logger.close(status)
        sigma = {name: buf.item() for name, buf in self.model.named_buffers() if name.endswith(("sigma_mean", "sigma_std"))}
        return {**metrics, "step": self.step, "epoch": self.cursor.epoch, "sigma_stats": sigma,
                "bad_steps": self.guard.total, **self.stopped}

    def stop(self, signum: int, metrics: dict) -> None:
        """A stop request reached every rank at a step boundary: checkpoint this step (unless the
        newest checkpoint already is this step) and end the run; the next run resumes here."""
        name = signal_name(signum) if signum else "a signal to another rank"
        self.stopped = {"preempted": 1, "preempted_by": name}
        if self.saved_step != self.step:
            self.checkpoint({**metrics, "preempted": 1})
        else:  # this step's checkpoint exists: only tell the driver why the run ends
            self.ctx.report(_scalars({**metrics, "preempted": 1}, self.step))
        if self.ctx.rank == 0:
            where = self.ctx.checkpoint_location(self.step)
            print(f"stopped by {name} at step {self.step}: checkpoint {where}; run the same command again to "
                  f"resume from it", flush=True)

    def micro_step(self, batch, labelled_global: list[float], window: ComponentWindow) -> None:
        """Forward + backward (:func:`cfdist.run.step.train_step`) + the engine's step (an
        optimiser step at a gradient-accumulation boundary); the sums go to ``window``.

        Under ZeRO-3 an energy model's parameters stay gathered for the whole micro-step (the
        double backward of forces / stress runs outside any module's hooks)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        with zero3_parameters_held(self.engine, self.energy and self.cfg.deepspeed.zero_stage == 3):
            result = train_step(self.engine, batch, self.objective, labelled_global, self.ctx.world_size,
                                backward=self.engine.backward)
        self.cycle.append((result, batch.ids))
        if not boundary:
            self.engine.step()  # a micro-step: DeepSpeed only counts it
            return
        # before the update: any non-finite loss or gradient on any rank skips the step on all of them
        # (fp16: gradient overflow is the loss scaler's business, skipped and rescaled by DeepSpeed itself;
        # only a non-finite loss counts here)
        held = () if self.cfg.deepspeed.precision == "fp16" else self.model.parameters()
        bad = local_bad([r.loss_share for r, _ in self.cycle], held)
        if self.all_sum([float(bad)])[0]:
            skip_step(self.engine)
            self.guard.skipped(self.step + 1, [i for _, ids in self.cycle for i in ids])
        else:
            self.guard.good()
            self.record_grad_norm(boundary)
            self.engine.step()
            for r, _ in self.cycle:  # a skipped step's NaN never reaches the logged loss
                window.add(r.sums, r.loss_share)
        self.cycle = []

    def record_grad_norm(self, boundary: bool) -> None:
        """DeepSpeed only records the norm when ZeRO or mixed precision clips; here grads are whole
        (and already averaged over ranks at the boundary), so measure before the step clips them."""
        if boundary and self.cfg.deepspeed.zero_stage == 0 and self.cfg.deepspeed.precision == "fp32":
            norms = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def window_metrics(self, w: StepWindow, components: ComponentWindow) -> dict:
        values, sums = w.values(), components.values()
        # one all-reduce: throughput, component sums and (a mixture) each dataset's draws in the window
        tot = self.all_sum(values + sums + self.drawn.reshape(-1).tolist())
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self.grad_norm if grad_norm is None else grad_norm
        metrics = w.summary(world=self.ctx.world_size, totals=tot[:len(values)])
        metrics.update(components.summary(tot[len(values):len(values) + len(sums)], "", train=True))
        if not components.micro_steps:  # every step of the window was skipped (bad): no loss to show
            metrics.pop("loss", None)
        if self.sources:  # what each dataset got in this window, over all ranks
            drawn = np.array(tot[len(values) + len(sums):]).reshape(self.drawn.shape)
            for k, source in enumerate(self.sources):
                metrics[f"structures/{source.name}"] = int(drawn[1, k])
                metrics[f"batches/{source.name}"] = int(drawn[0, k])
            self.drawn[:] = 0
        metrics.update(lr=float(self.scheduler.get_last_lr()[0]),
                       grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                       peak_memory_mb=peak_memory_mb(self.ctx.device), epoch=self.cursor.epoch)
        return metrics

    def validate(self) -> dict:
        """``val_mae/<component>`` (original units; energy models: meV/atom, meV/A, GPa) and
        ``val_loss`` over the val split, every rank evaluating its block
        (:func:`cfdist.run.evaluation.evaluate`; under ZeRO-3 the ranks run in lockstep)."""
        zero3 = self.cfg.deepspeed.zero_stage == 3
        if self.sources:  # every dataset's val split, each batch tagged with its dataset
            batches = (dataclasses.replace(b, dataset=s.name) for s in self.sources for b in evaluation.split_batches(
                s.shards, self.cfg.data.val_split, s.targets, s.budget, forces=s.forces, stress=s.stress,
                rank=self.ctx.rank, world=self.ctx.world_size, block_width=self.cfg.compute.entry_chunk))
        else:
            batches = evaluation.split_batches(self.shards, self.cfg.data.val_split, self.targets, self.budget,
                                               forces=self.want_forces, stress=self.want_stress,
                                               rank=self.ctx.rank, world=self.ctx.world_size,
                                               block_width=self.cfg.compute.entry_chunk)
        totals = evaluation.evaluate(
            self.engine, batches, self.objective, self.ctx.device, all_sum=self.all_sum,
            lockstep=zero3 and self.ctx.world_size > 1,
            hold=lambda: zero3_parameters_held(self.engine, self.energy and zero3))
        return evaluation.metrics(self.objective, totals, "val_")

    def checkpoint(self, metrics: dict) -> None:
        """All ranks save their DeepSpeed state; the context persists the directory."""
        # every rank's stream position, so that a resume reads on from there (cfdist.stream)
        world = self.ctx.world_size
        if self.sources:  # per rank, every dataset's (epoch, window, offset)
            width = 3 * len(self.sources)
            mine = [0.0] * (width * world)
            mine[width * self.ctx.rank:width * (self.ctx.rank + 1)] = self.position.values()
            flat = self.all_sum(mine)
            self.cursor.mixture = [[int(v) for v in flat[width * r:width * (r + 1)]] for r in range(world)]
        else:
            mine = [0.0] * (2 * world)
            mine[2 * self.ctx.rank:2 * self.ctx.rank + 2] = [float(self.position.window), float(self.position.offset)]
            flat = self.all_sum(mine)
            self.cursor.positions = [[int(flat[2 * r]), int(flat[2 * r + 1])] for r in range(world)]
        self.cursor.world_size = world
        # JSON numbers round-trip a float64 exactly: reference energies keep all their digits
        buffers = {name: (buf.item() if buf.numel() == 1 else
                          (buf.double() if buf.dtype == torch.float64 else buf.float()).cpu().tolist())
                   for name, buf in self.model.named_buffers() if buf.is_floating_point()}
        state = {"step": self.step, "cursor": self.cursor.to_dict(), "run_name": self.cfg.run_name,
                 "model_config": self.model.config.to_dict(), "config": self.cfg.to_dict(), "buffers": buffers}
        if self.init_report:
            state["init_from"] = self.init_report
        client = {"step": self.step, "cursor": self.cursor.to_dict()}

        def write(path: Path) -> None:
            self.engine.save_checkpoint(str(path), tag=DEEPSPEED_TAG, client_state=client)
            if self.ctx.rank == 0:
                write_json_atomic(path / STATE_FILE, state, indent=1, default=_json_default)

        self.ctx.save_checkpoint(self.step, write, _scalars(metrics, self.step))
        self.saved_step = self.step


def _scalars(metrics: dict, step: int) -> dict:
    out = {"step": step}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
    return out


def _json_default(obj):
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------- entry points
def ray_train_loop(loop_config: dict) -> None:
    """``train_loop_per_worker`` of the Ray TorchTrainer built by :func:`cfdist.train.driver.run_ray`."""

    quiet_ray_data()
    cfg = config_from_dict(loop_config["config"])
    watch_board(loop_config.get("stop_board", ""))  # the driver's SIGTERM / Ctrl-C reaches this worker
    shards, columns = open_data(cfg)
    Trainer(cfg, RayContext(cfg, columns, shards), shards).run()
    if dist.is_initialized():
        dist.barrier()


def local_train_loop(cfg: PretrainConfig) -> dict:
    """Train in this process (world size 1) or as one torchrun rank (RANK/WORLD_SIZE set)."""
    shards, columns = open_data(cfg)
    with stop_on_signals():  # SIGTERM / Ctrl-C: checkpoint at the next step boundary, then stop
        result = Trainer(cfg, LocalContext(cfg, columns, shards), shards).run()
    if dist.is_initialized():
        dist.barrier()
    return result


def open_data(cfg: PretrainConfig):
    """(the run's shards, their training columns): a :class:`ShardSet` and its columns, or for a
    mixture the list of :class:`cfdist.train.datasets.DatasetSource` (each with its columns) and None."""
    if cfg.data.is_mixture:
        return mixture_sources(cfg), None
    shards = ShardSet(cfg.data.shards)
    return shards, training_columns_for(shards, cfg)


def training_columns_for(shards: ShardSet, cfg: PretrainConfig) -> list[str]:
    first = shards.files(cfg.data.train_split)[0].path
    forces, stress = label_columns_wanted(cfg)
    return training_columns(read_schema(first), cfg.data.targets, forces=forces, stress=stress)


def label_columns_wanted(cfg: PretrainConfig) -> tuple[bool, bool]:
    """(forces, stress): whether the run trains on them (an energy model with a nonzero weight)."""
    if cfg.data.is_mixture:  # any dataset's (each dataset's own: DatasetEntry.wants)
        wants = [d.wants() for d in cfg.data.datasets]
        return any(w[0] for w in wants), any(w[1] for w in wants)
    if not cfg.model_config().energy:
        return False, False
    return cfg.loss.forces_weight > 0, cfg.loss.stress_weight > 0


def training_budget(cfg: PretrainConfig) -> BatchBudget:
    """The micro-batch budget; runs that differentiate the energy (forces / stress) pack
    ``max_entries / data.force_memory_factor`` entries (the graph kept for the double backward)."""
    d = cfg.data
    max_entries = d.max_entries
    if any(label_columns_wanted(cfg)):
        max_entries = max(1, int(d.max_entries / d.force_memory_factor))
    return BatchBudget(max_entries, d.max_atoms, d.max_structures)
