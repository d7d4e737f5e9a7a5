"""Run short local trainings for several DeepSpeed settings in one torchrun job (used by tests/test_pretrain.py).

    torchrun --nproc_per_node 2 tests/scripts/train_matrix.py SHARDS OUT_DIR SPEC [SPEC ...]

SPEC = "stage,precision,ckpt[,grad_accum]" (e.g. "3,bf16,1" or "2,fp32,0,2"). Every rank trains; rank 0 exports each run's
final checkpoint, loads it with cfdist.load, and prints one JSON line per run:
{"spec", "losses", "grad_norms", "exported_prediction"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TINY_MODEL = {"n_blocks": 2, "d_model": 32, "n_heads": 4, "d_ff": 64, "n_basis": 16, "head_hidden": 32}


def main() -> None:
    import os

    import torch.distributed as dist

    from cfdist.checkpoint import export_deepspeed_checkpoint, find_latest_checkpoint, load
    from cfdist.config import build
    from cfdist.train.config import PretrainConfig
    from cfdist.train.loop import local_train_loop

    shards, out, specs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ.get("RANK", 0))
    for spec in specs:
        stage, precision, ckpt, *rest = spec.split(",")
        accum = int(rest[0]) if rest else 1
        cfg = build(PretrainConfig, {
            "run_name": f"z{stage}-{precision}-ckpt{ckpt}-acc{accum}", "output_dir": str(out), "seed": 0, "max_steps": 6,
            "log_every": 1, "val_every": 100, "checkpoint_every": 6, "model": TINY_MODEL,
            "data": {"shards": shards, "targets": ["e_form"], "val_split": "", "max_structures": 64,
                     "max_entries": 10**7, "max_atoms": 10**5, "shuffle_rows": 0, "verify_checksums": False},
            "optim": {"lr": 2e-3, "schedule": "constant"},
            "deepspeed": {"zero_stage": int(stage), "precision": precision, "activation_checkpointing": ckpt == "1",
                          "gradient_accumulation_steps": accum},
            "scaling": {"num_workers": 2},
        }, source=spec)
        result = local_train_loop(cfg)
        dist.barrier()
        # sigma statistics were pooled over both ranks by the first forward: identical everywhere
        import torch

        mine = torch.tensor([v for _, v in sorted(result["sigma_stats"].items())], dtype=torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        if rank == 0:
            records = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
            train = [r for r in records if "loss" in r]
            model_path = export_deepspeed_checkpoint(find_latest_checkpoint(cfg.run_dir() / "checkpoints"),
                                                     cfg.run_dir() / "model.pt")
            model = load(model_path)
            from ase.build import bulk

            pred = model.predict([bulk("NaCl", "rocksalt", a=5.64)])
            print("RESULT " + json.dumps({"spec": spec, "losses": [r["loss"] for r in train],
                                          "grad_norms": [r["grad_norm"] for r in train],
                                          "structures_per_step": [r["structures_per_step"] for r in train],
                                          "exported_prediction": pred.tolist(),
                                          "sigma_stats_equal_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
                                          "sigma_std": [v for k, v in sorted(result["sigma_stats"].items())
                                                        if k.endswith("sigma_std")]}),
                  flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
