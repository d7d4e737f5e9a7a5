"""Export a training checkpoint as a portable checkpoint (no DeepSpeed or Ray needed to load it).

    python -m cfdist.export RUN_DIR_OR_CHECKPOINT OUT.pt

RUN_DIR: the latest checkpoint below it (highest step) is exported; a checkpoint directory
(one holding ``cfdist_state.json``) is exported as is. Load with ``cfdist.load(OUT.pt)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cfdist.checkpoint import STATE_FILE, export_deepspeed_checkpoint, find_latest_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cfdist.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="run directory or training checkpoint directory")
    parser.add_argument("out", type=Path, help="portable checkpoint file to write")
    args = parser.parse_args(argv)
    source = args.source if (args.source / STATE_FILE).is_file() else find_latest_checkpoint(args.source)
    out = export_deepspeed_checkpoint(source, args.out)
    print(f"exported {source} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
