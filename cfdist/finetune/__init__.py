"""Fine-tuning on small labelled datasets.

    config.py     FinetuneConfig (+ sections): the paper's recipe as defaults
    loop.py       the loop: in-memory splits, epochs of seeded permutations, SWA, best / last checkpoints
    tasks.py      the paper's benchmark tasks: downloads and exact split rules (cfdist prepare-task)
    driver.py     effective config (resume), checks, run directory, this process or Ray Train workers

    cfdist finetune --config megnet_slice_eform [key=value ...]       (or python launch/finetune.py ...)
    cfdist prepare-task megnet_eform --out data/megnet_eform          (download + split + preprocess)
"""

from cfdist.finetune.config import FinetuneConfig, load_finetune_config

__all__ = ["FinetuneConfig", "load_finetune_config"]
