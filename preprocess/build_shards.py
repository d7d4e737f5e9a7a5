"""Raw crystal files -> content-hashed Parquet shards of crystals and image tables (Ray Data).

    python preprocess/build_shards.py INPUT... --out DIR [--format FMT] [--targets e_form gap]
        [--model-config crystalformer | --cutoff 8.91]
        [--split-file split.json | --split-fractions 0.8 0.1 0.1] [--shard-size 4096]

    # against a running cluster (the job connects through RAY_ADDRESS)
    ray job submit --working-dir . -- python preprocess/build_shards.py ...

The same as ``cfdist preprocess``: the command line is :mod:`cfdist.preprocess.cli`, the job
:mod:`cfdist.preprocess.job`, the readers :mod:`cfdist.io` (``--help`` lists the options).
"""

import sys

from cfdist.preprocess.cli import main

if __name__ == "__main__":
    sys.exit(main())
