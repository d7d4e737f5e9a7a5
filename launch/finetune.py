"""Fine-tune Crystalformer on a small labelled dataset (paper recipe by default).

    python launch/finetune.py --config megnet_slice_eform data.shards=data/megnet_slice [key=value ...]
    python launch/finetune.py --config megnet_slice_eform init_from=pretrained checkpoint=model.pt
    python launch/finetune.py --config megnet_slice_eform init_from=resume          # continue a run
    ray job submit --working-dir . -- python launch/finetune.py --config ... scaling.num_workers=4

The same as ``cfdist finetune``; everything it does is in :mod:`cfdist.finetune.driver`
(``--help`` lists the options).
"""

import sys

from cfdist.finetune.driver import main

if __name__ == "__main__":
    sys.exit(main())
