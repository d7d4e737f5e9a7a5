"""The tests' one torchrun program: short DeepSpeed trainings (property or energy models, any ZeRO
stage / precision / activation checkpointing / gradient accumulation / compile), one after the
other in the same ranks, each written as a JSON result file.

    torchrun --nproc_per_node 2 tests/scripts/train_matrix.py RUNS.json OUT_DIR

RUNS.json is a list of :class:`RunSpec` dicts (unknown keys are errors). Every rank trains every
run (``cfdist.train.loop.local_train_loop``); a run with ``stop_at`` first stops at that step and a
second run of the same name resumes it to ``max_steps``. Rank 0 then exports the run's last
checkpoint, loads it with ``cfdist.load`` and writes ``OUT_DIR/<name>/result.json`` (see
:func:`result`). Launched by ``conftest.deepspeed_runs``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunSpec:
    """One short training run (a PretrainConfig with the tests' fixed choices filled in)."""

    name: str  # run_name; also the result's directory under OUT_DIR
    shards: str
    targets: list[str]
    model: dict
    zero_stage: int = 0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False  # compute.compile (the backend: the job's CFDIST_COMPILE_BACKEND)
    gradient_accumulation_steps: int = 1
    max_structures: int = 64  # 64: the whole train split of the test shards in one micro-batch (a fixed batch)
    max_steps: int = 6
    stop_at: int | None = None  # first train to this step, then resume the same run to max_steps
    val_split: str = ""
    val_every: int = 100
    checkpoint_every: int = 6
    keep_checkpoints: int = 3
    loss: dict = field(default_factory=dict)  # PretrainConfig.loss overrides (energy runs)


def config(spec: RunSpec, out: Path, max_steps: int):
    from cfdist.config import build
    from cfdist.train.config import PretrainConfig

    return build(PretrainConfig, {
        "run_name": spec.name, "output_dir": str(out), "seed": 0, "max_steps": max_steps, "log_every": 1,
        "val_every": spec.val_every, "checkpoint_every": spec.checkpoint_every,
        "keep_checkpoints": spec.keep_checkpoints, "model": spec.model, "loss": spec.loss,
        "compute": {"compile": spec.compile},
        "data": {"shards": spec.shards, "targets": spec.targets, "val_split": spec.val_split,
                 "max_structures": spec.max_structures, "max_entries": 10**7, "max_atoms": 10**5, "shuffle_rows": 0,
                 "verify_checksums": False},
        "optim": {"lr": 2e-3, "schedule": "constant"},
        "deepspeed": {"zero_stage": spec.zero_stage, "precision": spec.precision,
                      "activation_checkpointing": spec.activation_checkpointing,
                      "gradient_accumulation_steps": spec.gradient_accumulation_steps},
        "scaling": {"num_workers": 2},
    }, source=f"run {spec.name!r}")


def train(spec: RunSpec, out: Path) -> tuple[dict, list[str]]:
    """Train ``spec`` on this rank; returns local_train_loop's result and the lines this rank printed
    (also passed through to stdout: the torchrun log stays whole)."""
    import torch.distributed as dist

    from cfdist.train.loop import local_train_loop

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if spec.stop_at is not None:
            local_train_loop(config(spec, out, spec.stop_at))
            dist.barrier()
        trained = local_train_loop(config(spec, out, spec.max_steps))
    sys.stdout.write(printed.getvalue())
    sys.stdout.flush()
    return trained, printed.getvalue().splitlines()


def sigma_stats_equal_across_ranks(sigma_stats: dict) -> bool:
    """Whether every rank holds the same sigma statistics (pooled over the ranks by the first batch)."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([v for _, v in sorted(sigma_stats.items())], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def result(spec: RunSpec, out: Path, trained: dict, printed: list[str], equal_sigma: bool) -> dict:
    """What the tests check of a run: its metrics (one entry per logged step), the last validation
    record, what rank 0 printed, and the exported model.pt loaded back (predictions, reference
    energies, compile state)."""
    import pyarrow.parquet as pq
    import torch
    from ase.build import bulk

    from cfdist.checkpoint import export_deepspeed_checkpoint, find_latest_checkpoint, load, read_state
    from cfdist.shards import collate_arrow

    run_dir = config(spec, out, spec.max_steps).run_dir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    val = [r for r in records if any(k.startswith("val_") for k in r)]
    last = find_latest_checkpoint(run_dir / "checkpoints")
    state = read_state(last)
    model_pt = export_deepspeed_checkpoint(last, run_dir / "model.pt")
    model = load(model_pt)
    row = {
        "name": spec.name, "resumed": spec.stop_at is not None, "stdout": printed, "model_pt": str(model_pt),
        "steps": [r["step"] for r in train_records], "losses": [r["loss"] for r in train_records],
        "grad_norms": [r["grad_norm"] for r in train_records],
        "structures_per_step": [r["structures_per_step"] for r in train_records],
        "bad_steps": {r["step"]: r["bad_steps"] for r in records if "bad_steps" in r},  # running total per step
        "checkpoints": sorted(str(p) for p in (run_dir / "checkpoints").glob("step_*")),
        "val": val[-1] if val else None, "sigma_stats_equal_across_ranks": equal_sigma,
        "sigma_std": [v for k, v in sorted(trained["sigma_stats"].items()) if k.endswith("sigma_std")],
        # a compiled module is wrapped (torch.compile) or carries a compiled call (Module.compile)
        "exported_compiled": isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        or getattr(model, "_compiled_call_impl", None) is not None,
        "exported_compile_flag": "compile" in model.config.to_dict(), "init_from": state.get("init_from"),
    }
    nacl = [bulk("NaCl", "rocksalt", a=5.64)]
    if model.config.energy:
        reference = torch.tensor(state["buffers"]["element_energy"], dtype=torch.float64)
        row.update({
            "force_mae": [r["mae/forces_mev_per_A"] for r in train_records],
            "stress_mae": [r["mae/stress_gpa"] for r in train_records],
            "element_energy_dtype": str(model.element_energy.dtype),
            "exported_reference_exact": bool(torch.equal(model.element_energy, reference)),
            "reference_nonzero": int((reference != 0).sum()), "energy_scale": state["buffers"]["energy_scale"],
            "exported_energy": model.predict(nacl, forces=True)["energy"].tolist()})
    else:
        table = pq.read_table(min(Path(spec.shards).glob("val/*.parquet")))
        prediction = model(collate_arrow(table, spec.targets).to(dtype=model.embedding.weight.dtype))
        row.update({"exported_prediction": model.predict(nacl).tolist(),
                    "exported_prediction_finite": all(math.isfinite(v) for v in prediction.flatten().tolist())})
    return row


def main(runs_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from cfdist.config import build

    out = Path(out_dir)
    specs = [build(RunSpec, r, source=f"{runs_file}[{k}]") for k, r in enumerate(json.loads(Path(runs_file).read_text()))]
    rank = int(os.environ.get("RANK", 0))
    for spec in specs:
        trained, printed = train(spec, out)
        dist.barrier()
        equal_sigma = sigma_stats_equal_across_ranks(trained["sigma_stats"])
        if rank == 0:
            row = result(spec, out, trained, printed, equal_sigma)
            (out / spec.name).mkdir(parents=True, exist_ok=True)
            (out / spec.name / "result.json").write_text(json.dumps(row, indent=1))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
