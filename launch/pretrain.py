"""Distributed pretraining: Ray Train TorchTrainer + DeepSpeed, streaming preprocessed shards.

    python launch/pretrain.py --config megnet_slice data.shards=data/megnet_slice [key=value ...]

    # on a running cluster (shards and output_dir on storage every node sees)
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python launch/pretrain.py --config megnet_slice data.shards=/shared/shards/mptrj \
        output_dir=/shared/runs scaling.num_workers=16 scaling.use_gpu=true

    # no Ray: this process, or each torchrun rank, trains on its block of the train rows
    torchrun --nproc_per_node 2 launch/pretrain.py --config ... --no-ray

The same as ``cfdist pretrain``; everything it does is in :mod:`cfdist.train.driver`
(``--help`` lists the options).
"""

import sys

from cfdist.train.driver import main

if __name__ == "__main__":
    sys.exit(main())
