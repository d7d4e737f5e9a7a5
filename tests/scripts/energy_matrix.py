"""Short energy / force / stress trainings for several DeepSpeed settings in one torchrun job
(used by tests/test_energy_training.py).

    torchrun --nproc_per_node 2 tests/scripts/energy_matrix.py SHARDS OUT_DIR SPEC [SPEC ...]

SPEC = "stage,precision,ckpt,max_structures[,stop]" (e.g. "3,fp32,0,64" or "3,bf16,1,64"). Every rank
trains a tiny energy model (CHGNet-default loss on energies, forces and stress) for 4 steps; with
``stop`` the run first stops at step ``stop`` and a second run of the same name resumes it to 4.
Rank 0 exports each run's last checkpoint, loads it with cfdist.load and prints one line per run:
RESULT {"spec", "losses", "force_mae", "grad_norms", "structures_per_step", "val", "exported_reference_exact",
"element_energy_dtype", "reference_nonzero", "energy_scale", "exported_energy", "model_pt",
"sigma_stats_equal_across_ranks", "resumed"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TINY_ENERGY_MODEL = {"energy": True, "n_blocks": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "n_basis": 16,
                     "head_hidden": 32, "cutoff_sigmas": 3.0}


def config(shards: str, out: Path, spec: str, max_steps: int):
    from cfdist.config import build
    from cfdist.train.config import PretrainConfig

    stage, precision, ckpt, max_structures, *_ = spec.split(",")
    return build(PretrainConfig, {
        "run_name": "e" + spec.replace(",", "-"), "output_dir": str(out), "seed": 0, "max_steps": max_steps,
        "log_every": 1, "val_every": 4, "checkpoint_every": 2, "keep_checkpoints": 3, "model": TINY_ENERGY_MODEL,
        "data": {"shards": shards, "targets": ["energy"], "max_structures": int(max_structures), "max_entries": 10**7,
                 "max_atoms": 10**5, "shuffle_rows": 0, "verify_checksums": False},
        "optim": {"lr": 2e-3, "schedule": "constant"},
        "deepspeed": {"zero_stage": int(stage), "precision": precision, "activation_checkpointing": ckpt == "1"},
        "scaling": {"num_workers": 2},
    }, source=spec)


def main() -> None:
    import os

    import torch
    import torch.distributed as dist

    from cfdist.checkpoint import export_deepspeed_checkpoint, find_latest_checkpoint, load, read_state
    from cfdist.train.loop import local_train_loop

    shards, out, specs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ.get("RANK", 0))
    for spec in specs:
        parts = spec.split(",")
        stop = int(parts[4]) if len(parts) > 4 else None
        if stop is not None:
            local_train_loop(config(shards, out, spec, stop))
            dist.barrier()
        cfg = config(shards, out, spec, 4)
        result = local_train_loop(cfg)
        dist.barrier()
        mine = torch.tensor([v for _, v in sorted(result["sigma_stats"].items())], dtype=torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        if rank == 0:
            records = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if "loss" in r]
            val = [r for r in records if "val_mae/forces_mev_per_A" in r]
            last = find_latest_checkpoint(cfg.run_dir() / "checkpoints")
            state = read_state(last)
            model_pt = export_deepspeed_checkpoint(last, cfg.run_dir() / "model.pt")
            model = load(model_pt)
            from ase.build import bulk

            energy = model.predict([bulk("NaCl", "rocksalt", a=5.64)], forces=True)["energy"]
            reference = torch.tensor(state["buffers"]["element_energy"], dtype=torch.float64)
            print("RESULT " + json.dumps({
                "spec": spec, "losses": [r["loss"] for r in train], "steps": [r["step"] for r in train],
                "force_mae": [r["mae/forces_mev_per_A"] for r in train],
                "stress_mae": [r["mae/stress_gpa"] for r in train],
                "grad_norms": [r["grad_norm"] for r in train],
                "structures_per_step": [r["structures_per_step"] for r in train], "val": val[-1] if val else None,
                "element_energy_dtype": str(model.element_energy.dtype),
                "exported_reference_exact": bool(torch.equal(model.element_energy, reference)),
                "reference_nonzero": int((reference != 0).sum()),
                "energy_scale": state["buffers"]["energy_scale"], "init_from": state.get("init_from"),
                "exported_energy": energy.tolist(), "model_pt": str(model_pt),
                "sigma_stats_equal_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
                "resumed": stop is not None}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
