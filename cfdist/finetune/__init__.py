"""Fine-tuning on small labelled datasets: config, transfer from a portable checkpoint, the loop, paper tasks.

    python launch/finetune.py --config configs/finetune/megnet_slice_eform.yaml [key=value ...]
    cfdist finetune --config ...            (same)
    cfdist prepare-task megnet_eform --out data/megnet_eform   (download + split + preprocess)
"""

from cfdist.finetune.config import FinetuneConfig, load_finetune_config

__all__ = ["FinetuneConfig", "load_finetune_config"]
