"""Built-in example: real crystals -> validation -> image tables -> Crystalformer.

Reads the MEGNet slice shipped in ``../shared/data`` (3,909 Materials Project crystals),
validates every structure (rejects are counted with their reasons, never dropped
silently), builds the sphere-cutoff image tables, then runs the default model on
batches of 128: forward + backward throughput and predictions of a fresh model for the
test split, written to ``outputs/example/``.

    python launch/example.py [--data PATH] [--config configs/model/crystalformer.yaml] [--out DIR]

Later stages of the pipeline (Ray preprocessing, DeepSpeed pretraining, fine-tuning)
extend this example as they land.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "megnet_slice.json.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JARVIS-style JSON list (.json or .json.gz)")
    parser.add_argument("--split", type=Path, default=None, help="split file (default: <data>_split.json if present)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "model" / "crystalformer.yaml")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "example")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--train-batches", type=int, default=3, help="forward+backward batches to time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from cfdist import Crystalformer, CrystalformerConfig, collate, count_parameters, image_table
    from cfdist.crystal import InvalidCrystalError, from_jarvis, validate

    if not args.data.exists():
        parser.error(f"data file not found: {args.data}")
    torch.manual_seed(args.seed)
    config = CrystalformerConfig.from_yaml(args.config)
    model = Crystalformer(config)
    print(f"model: {config.n_blocks} blocks, {count_parameters(model):,} parameters, "
          f"image-table cutoff {config.cutoff:.3f} A ({config.cutoff_sigmas} x sigma_max {config.sigma_max:.3f} A)")

    opener = gzip.open if args.data.suffix == ".gz" else open
    with opener(args.data, "rt") as f:
        records = json.load(f)
    crystals, rejects = [], collections.Counter()
    for index, record in enumerate(tqdm(records, desc="validate", unit="struct")):
        rid = str(record.get("id", f"{args.data.name}:{index}"))
        try:
            crystal = from_jarvis(record["atoms"], id=rid, labels={"e_form": record.get("e_form")})
            crystals.append(validate(crystal))
        except (InvalidCrystalError, KeyError, TypeError) as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            rejects[reason] += 1
            tqdm.write(f"rejected {rid}: {exc}")
    print(f"structures: {len(records)} read, {len(crystals)} valid, {sum(rejects.values())} rejected {dict(rejects)}")

    start = time.perf_counter()
    tables = [image_table(c.lattice, c.positions, config.cutoff) for c in tqdm(crystals, desc="image tables",
                                                                                unit="struct")]
    elapsed = time.perf_counter() - start
    n_entries = sum(len(t) for t in tables)
    n_atoms = sum(c.n_atoms for c in crystals)
    print(f"image tables: {len(tables) / elapsed:,.0f} structures/s, {n_entries / n_atoms:.0f} entries/atom, "
          f"{n_entries:,} entries in all")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), weight_decay=1e-5)
    steps = []
    for b in range(args.train_batches):
        sl = slice(b * args.batch_size, (b + 1) * args.batch_size)
        batch = collate(crystals[sl], tables[sl], ["e_form"])
        t0 = time.perf_counter()
        loss = (model(batch).squeeze(-1) - batch.labels[:, 0].float()).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps.append((time.perf_counter() - t0, batch.n_crystals, int(batch.n_atoms.sum()), batch.n_entries))
        print(f"step {b}: L1 loss {loss.item():.4f} eV/atom, {steps[-1][1] / steps[-1][0]:.0f} structures/s, "
              f"{steps[-1][3] / steps[-1][0]:,.0f} table entries/s")

    split_path = args.split or args.data.with_name(args.data.name.replace(".json.gz", "_split.json"))
    test_ids = set(json.loads(split_path.read_text())["test"]) if split_path.exists() else None
    test = [c for c in crystals if test_ids is None or c.id in test_ids]
    predictions = model.predict(test, batch_size=args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    out_csv = args.out / "predictions_untrained.csv"
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "e_form_true", "e_form_pred"])
        for crystal, pred in zip(test, predictions[:, 0].tolist()):
            writer.writerow([crystal.id, crystal.labels.get("e_form"), f"{pred:.6f}"])
    print(f"predicted {len(test)} structures ({'test split' if test_ids else 'all'}) -> {out_csv}")
    print("note: the model here is freshly initialised; training lands with launch/pretrain.py and launch/finetune.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
