"""The fine-tuning loop, read top to bottom: build -> (epoch: shuffle -> step -> [SWA]) -> validate
-> best / last checkpoints -> test the best and the SWA model.

Fine-tuning sets are small (hundreds to tens of thousands of crystals), so each split is held
in memory as one Arrow table and batches are fixed-size random subsets, as in the paper: each
epoch is a permutation seeded by (seed, epoch), cut into ``batch_size`` structures per optimiser
step (``drop_last`` as in the reference). A step whose batch holds more than
``data.max_entries`` image-table entries is split into micro-batches whose gradients add up to
the same step (memory stays bounded for large cells). From scratch, the sigma statistics are
set by the first micro-batch of the first step (the whole first batch when it is not split).

One process by default (``scaling.num_workers: 0``). With Ray Train workers the same loop runs
under DDP: each rank takes a stride of every batch, the loss is scaled by the global label count,
and rank 0 validates and writes checkpoints (``output_dir`` must be storage all nodes see).

Checkpoints in ``<run_dir>/checkpoints``: ``best.pt`` (portable, lowest validation loss),
``swa.pt`` (portable, the SWA average at the end), ``last.pt`` (full state after every epoch:
model, optimiser, schedule, SWA average, RNG-free epoch counter; ``init_from=resume`` continues
from it exactly, since epoch permutations depend only on (seed, epoch)).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from cfdist.checkpoint import load_checkpoint_file, save_portable
from cfdist.data import training_columns
from cfdist.fileio import atomic_write, write_json_atomic
from cfdist.finetune.config import FinetuneConfig
from cfdist.finetune.transfer import freeze, model_from_pretrained
from cfdist.manifest import ShardSet
from cfdist.run.metrics import MetricLogger, StepWindow, peak_memory_mb
from cfdist.run.objective import masked_abs_error, normalised_targets, set_target_normalisation, target_stats
from cfdist.run.optim import lr_factor, parameter_groups
from cfdist.shards import collate_arrow, read_shard

LAST, BEST, SWA = "last.pt", "best.pt", "swa.pt"


class SplitData:
    """All rows of one split in memory (one Arrow table); ``batch(indices)`` collates a subset."""

    def __init__(self, shards: ShardSet, split: str, targets: list[str], block_width: int = 32):
        import pyarrow.parquet as pq

        files = shards.files(split)
        columns = training_columns(pq.read_schema(files[0].path), targets)
        self.table = pa.concat_tables([read_shard(e.path, columns) for e in files]).combine_chunks()
        self.targets, self.cutoff, self.split = targets, shards.cutoff, split
        self.block_width = block_width
        self.n_entries = self.table["n_entries"].to_numpy().astype(np.int64)
        labels = np.stack([self.table[f"y.{t}"].to_numpy() for t in targets], axis=1)
        self.n_labels = np.isfinite(labels).sum(1)  # per row: lets every rank count a step's labels alone

    def __len__(self) -> int:
        return self.table.num_rows

    def batch(self, indices: np.ndarray):
        return collate_arrow(self.table.take(pa.array(np.asarray(indices, dtype=np.int64))), self.targets, self.cutoff,
                             block_width=self.block_width)

    def micro_batches(self, indices: np.ndarray, max_entries: int) -> list[np.ndarray]:
        """Split ``indices`` (in order) into runs of at most ``max_entries`` table entries (>= 1 row each)."""
        if max_entries <= 0 or len(indices) == 0:
            return [indices]
        out, start, total = [], 0, 0
        for k, n in enumerate(self.n_entries[indices]):
            if k > start and total + n > max_entries:
                out.append(indices[start:k])
                start, total = k, 0
            total += n
        out.append(indices[start:])
        return out


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool,
                  min_size: int = 1) -> list[np.ndarray]:
    """The epoch's batches: a permutation of range(n) seeded by (seed, epoch), cut into batch_size.

    The last, shorter batch is dropped with ``drop_last`` or when it has fewer than ``min_size``
    rows (one per data-parallel rank: a rank without rows would stall the others).
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < batch_size and (drop_last or len(batches[-1]) < min_size):
        batches.pop()
    return batches


def resume_config(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict]:
    """(the run's saved config marked ``init_from=resume``, the saved state) for ``cfg``'s run.

    A run continues with the settings it started with: everything but ``init_from`` comes from
    ``last.pt`` (differences in ``cfg`` are reported and ignored).
    """
    from cfdist.finetune.config import finetune_config_from_dict

    path = cfg.run_dir() / "checkpoints" / LAST
    if not path.is_file():
        raise FileNotFoundError(f"init_from=resume: no {path} (the run has not finished an epoch yet)")
    state = load_checkpoint_file(path)
    saved = {**state["config"], "init_from": "resume", "overwrite": False}
    given = cfg.to_dict()
    given["data"]["shards"] = str(Path(cfg.data.shards).resolve()) if cfg.data.shards else ""
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
        self.run_dir = cfg.run_dir()
        self.ckpt_dir = self.run_dir / "checkpoints"

    # -- setup ---------------------------------------------------------------------------
    def build(self) -> None:
        from cfdist.config import CrystalformerConfig
        from cfdist.model import Crystalformer, distributed_sum

        state, self.resume_state = self.resume_state, None
        if self.cfg.init_from == "resume" and state is None:  # not read by the driver: read it here, once
            self.cfg, state = resume_config(self.cfg)
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # same initial head on every rank
        self.shards = ShardSet(cfg.data.shards)
        targets = list(cfg.data.targets)
        chunk = cfg.compute.entry_chunk
        self.train = SplitData(self.shards, cfg.data.train_split, targets, chunk)
        self.val = SplitData(self.shards, cfg.data.val_split, targets, chunk) if cfg.data.val_split else None
        stats = target_stats(self.shards, targets, cfg.data.train_split)
        self.transfer_report: dict[str, Any] = {"init_from": cfg.init_from}
        if state is not None:  # weights come from last.pt; the architecture from the run itself
            model = Crystalformer(CrystalformerConfig.from_dict(state["model_config"]))
        elif cfg.init_from == "pretrained":
            model, report = model_from_pretrained(cfg.checkpoint, targets, cfg.transfer.head, stats)
            self.transfer_report.update(report)
        else:
            model = Crystalformer(cfg.model_config())
            set_target_normalisation(model, stats)
        if model.cutoff > self.shards.cutoff + 1e-9:
            raise ValueError(f"{cfg.data.shards}: tables built with cutoff {self.shards.cutoff:.4f} A but the model "
                             f"needs {model.cutoff:.4f} A; re-run preprocessing with --cutoff {model.cutoff:.4f}")
        self.transfer_report["frozen"] = freeze(model, embedding=cfg.transfer.freeze_embedding,
                                                blocks=cfg.transfer.freeze_blocks)
        self.model = model.to(self.device)
        if state is None and cfg.init_from == "scratch":
            # issue 17: a new model's sigma statistics come from an explicit pass over the first
            # micro-batch of the first step (pooled over ranks), before compiling / DDP; a
            # pretrained or resumed model has its checkpoint's
            batches = self.epoch_batches(0)  # none: refused below (steps_per_epoch)
            if batches:
                first = self.train.micro_batches(batches[0][self.rank::self.world], cfg.data.max_entries)[0]
                self.model.fit_sigma_statistics(self.train.batch(first).to(self.device), distributed_sum)
        if cfg.compute.compile:  # a run setting: also for pretrained / resumed models
            from cfdist.compile import compile_model, describe

            compile_model(self.model)  # in place (cfdist.compile): DDP, SWA copies and checkpoints see the model
            if self.rank == 0:
                print(describe(self.model), flush=True)
        self.ddp = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # statistics buffers are set identically on every rank (all-reduced), no need to broadcast
            self.ddp = DistributedDataParallel(self.model, broadcast_buffers=False)
        groups = parameter_groups(self.model, cfg.optim.weight_decay, scaled_blocks=cfg.transfer.lr_scale_blocks,
                                  lr_scale=cfg.transfer.lr_scale)
        for group in groups:
            group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
        if cfg.data.batch_size < self.world:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is smaller than the {self.world} workers")
        self.steps_per_epoch = len(self.epoch_batches(0))
        if self.steps_per_epoch == 0:
            raise ValueError(f"train split has {len(self.train)} structures, fewer than batch_size="
                             f"{cfg.data.batch_size} with drop_last; lower data.batch_size")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg.optim, self.total_steps))
        self.swa: AveragedModel | None = None
        self.epoch, self.step, self.best_val, self.best_epoch = 0, 0, math.inf, -1
        if state is not None:
            self.restore(state)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        d = self.cfg.data
        return epoch_batches(len(self.train), d.batch_size, self.cfg.seed, epoch, d.drop_last, min_size=self.world)

    def restore(self, state: dict) -> None:
        """Continue from a ``last.pt`` state (model, optimiser, schedule, SWA average, counters)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["swa"] is not None:
            self.swa = AveragedModel(self.model)
            self.swa.load_state_dict(state["swa"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.transfer_report = state["transfer_report"]
        if self.rank == 0:
            print(f"resumed {self.ckpt_dir / LAST} after epoch {self.epoch} (step {self.step}, best val loss {self.best_val:.4g} "
                  f"at epoch {self.best_epoch})", flush=True)

    # -- training ------------------------------------------------------------------------
    def run(self) -> dict:
        self.build()
        cfg = self.cfg
        logger = MetricLogger(self.run_dir, self.rank == 0, self.total_steps, self.step)
        window = StepWindow()
        try:
            while self.epoch < cfg.epochs:
                swa_phase = cfg.swa_epochs > 0 and self.epoch >= cfg.epochs - cfg.swa_epochs
                for indices in self.epoch_batches(self.epoch):
                    n_step = float(self.train.n_labels[indices].sum())
                    grad_norm = self.train_step(indices[self.rank::self.world], n_step, window)
                    self.step += 1
                    if swa_phase:  # paper: average after every step of the last epochs, lr held
                        if self.swa is None:
                            self.swa = AveragedModel(self.model)
                        self.swa.update_parameters(self.model)
                    else:
                        self.scheduler.step()
                    window.steps += 1
                    if self.step % cfg.log_every == 0:
                        logger.log(self.step, self.window_metrics(window, grad_norm))
                        window = StepWindow()
                self.epoch += 1
                record = {"epoch": self.epoch, "swa": swa_phase}
                if self.rank == 0:
                    if self.val is not None:
                        val = self.evaluate_split(self.model, self.val)
                        record.update(val)
                        if val["val_loss"] < self.best_val:  # NaN (no labels) never selects
                            self.best_val, self.best_epoch = val["val_loss"], self.epoch
                            save_portable(self.ckpt_dir / BEST, self.model, extra=self.extra("best"))
                    self.save_last()
                    logger.log(self.step, record)
                if self.report is not None:
                    self.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
        finally:
            logger.close()
        return self.finish() if self.rank == 0 else {}

    def train_step(self, indices: np.ndarray, n_global: float, window: StepWindow) -> torch.Tensor:
        """One optimiser step on this rank's ``indices``; ``n_global``: labels in the step on all ranks.

        Adds the step's micro-batches to ``window`` and returns the pre-clip gradient norm; the
        loss and the norm stay on the device so that a step never waits for it.
        """
        self.ddp.train()
        t0 = time.perf_counter()
        chunks = [self.train.batch(c).to(self.device)
                  for c in self.train.micro_batches(indices, self.cfg.data.max_entries)]
        t_data = time.perf_counter() - t0
        self.optimizer.zero_grad(set_to_none=True)
        for k, batch in enumerate(chunks):
            sync = k == len(chunks) - 1
            context = self.ddp.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
            with context:
                err, mask = masked_abs_error(self.ddp(batch).float(), normalised_targets(self.model, batch.labels))
                err = err.sum()
                # mean over the step's labels on all ranks (DDP averages gradients over ranks)
                (err * (self.world / max(n_global, 1.0))).backward()
            # host label counts (SplitData.n_labels) keep the step free of device syncs
            window.add(batch, err.detach(), 0.0, t_data if k == 0 else 0.0)
        window.labelled += float(self.train.n_labels[indices].sum())
        params = [p for p in self.model.parameters() if p.requires_grad]
        # pre-clip total norm; max_norm=inf measures without clipping when clipping is off
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip or math.inf)
        self.optimizer.step()
        return grad_norm

    def window_metrics(self, w: StepWindow, grad_norm: torch.Tensor) -> dict:
        return {**w.summary(), "lr": float(self.optimizer.param_groups[0]["lr"]), "grad_norm": float(grad_norm),
                "epoch": self.epoch, "peak_memory_mb": peak_memory_mb(self.device)}

    # -- evaluation and checkpoints ------------------------------------------------------
    @torch.no_grad()
    def evaluate_split(self, model, data: SplitData) -> dict:
        """``val_loss`` (normalised L1, the selection criterion) and MAE per target in original units."""
        was_training = model.training
        model.eval()
        k = len(data.targets)
        abs_norm, abs_orig, count = np.zeros(k), np.zeros(k), np.zeros(k)
        step = self.cfg.data.eval_batch_size
        for start in range(0, len(data), step):
            batch = data.batch(np.arange(start, min(start + step, len(data)))).to(self.device)
            target = normalised_targets(model, batch.labels.cpu(), torch.float64)
            err, mask = masked_abs_error(model(batch).double().cpu(), target)
            abs_norm += err.sum(0).numpy()
            abs_orig += (err * model.target_std.double().cpu()).sum(0).numpy()
            count += mask.sum(0).numpy()
        model.train(was_training)
        out = {"val_loss": float(abs_norm.sum() / count.sum()) if count.sum() else float("nan")}
        for t, name in enumerate(data.targets):
            out[f"val_mae/{name}"] = float(abs_orig[t] / count[t]) if count[t] else float("nan")
        return out

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
                 "epoch": self.epoch, "step": self.step, "best_val": self.best_val, "best_epoch": self.best_epoch,
                 "transfer_report": self.transfer_report, "config": self.cfg.to_dict(),
                 "model_config": self.model.config.to_dict()}
        with atomic_write(self.ckpt_dir / LAST) as tmp:
            torch.save(state, tmp)

    def finish(self) -> dict:
        """Save the SWA model, evaluate best / SWA / final on the test split, write results.json."""
        from cfdist.predict import evaluate

        cfg = self.cfg
        models = {"final": self.model}
        if self.swa is not None:
            models["swa"] = self.swa_model()
            save_portable(self.ckpt_dir / SWA, models["swa"], extra=self.extra("swa"))
        if (self.ckpt_dir / BEST).is_file():
            from cfdist.checkpoint import load

            models["best"] = load(self.ckpt_dir / BEST, map_location=self.device)
        save_portable(self.ckpt_dir / "final.pt", self.model, extra=self.extra("final"))
        results: dict[str, Any] = {"run_dir": str(self.run_dir), "epochs": self.epoch, "steps": self.step,
                                   "steps_per_epoch": self.steps_per_epoch, "best_epoch": self.best_epoch,
                                   "best_val_loss": self.best_val, "transfer": self.transfer_report,
                                   "n_train": len(self.train), "targets": list(cfg.data.targets)}
        if self.val is not None:
            results["val"] = {name: self.evaluate_split(m, self.val) for name, m in models.items()}
        test = cfg.data.test_split
        if test and self.shards.files(test):
            results["test"] = {}
            for name, model in models.items():
                metrics = evaluate(model, [str(cfg.data.shards)], self.run_dir / "evaluation" / name, split=test,
                                   batch_size=cfg.data.eval_batch_size)
                results["test"][name] = metrics["targets"]
            results["test"]["train_mean"] = self.train_mean_baseline(SplitData(self.shards, test, list(cfg.data.targets)))
        write_json_atomic(self.run_dir / "results.json", results)
        return results

    def train_mean_baseline(self, data: SplitData) -> dict:
        """MAE of predicting the train mean of each target (the trivial baseline)."""
        out = {}
        for name in data.targets:
            y = data.table[f"y.{name}"].to_numpy()
            y = y[np.isfinite(y)]
            mean, _ = self.shards.target_stats(name, self.cfg.data.train_split)
            out[name] = {"n": int(len(y)), "mae": float(np.abs(y - mean).mean()) if len(y) else None}
        return out


# ----------------------------------------------------------------------------- entry points
def local_finetune(cfg: FinetuneConfig, resume_state: dict | None = None) -> dict:
    """Fine-tune in this process (``cfg``: the effective config, see :func:`cfdist.finetune.driver.prepare`)."""
    if cfg.scaling.threads > 0:
        torch.set_num_threads(cfg.scaling.threads)
    device = "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    return FinetuneTrainer(cfg, device=device, resume_state=resume_state).run()


def ray_finetune_loop(loop_config: dict) -> None:
    """``train_loop_per_worker`` for Ray Train (DDP over the worker group)."""
    import ray.train
    import ray.train.torch

    from cfdist.finetune.config import finetune_config_from_dict

    cfg = finetune_config_from_dict(loop_config["config"])
    if cfg.scaling.threads > 0:
        torch.set_num_threads(cfg.scaling.threads)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    trainer = FinetuneTrainer(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=device,
                              report=lambda m: ray.train.report(m))
    trainer.run()
    if dist.is_initialized():
        dist.barrier()
