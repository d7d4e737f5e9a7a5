"""cfdist: distributed training of Crystalformer on Ray + DeepSpeed.

Pipeline: raw structures -> ``preprocess`` -> shards -> :mod:`cfdist.data` ->
:mod:`cfdist.model` -> :mod:`cfdist.train` -> checkpoint -> fine-tune / predict.
"""

from cfdist.batch import CrystalBatch, collate
from cfdist.config import CrystalformerConfig, table_cutoff
from cfdist.crystal import Crystal, InvalidCrystalError
from cfdist.geometry import ImageTable, image_table
from cfdist.model import Crystalformer, count_parameters

__version__ = "0.1.0"

__all__ = [
    "Crystal", "CrystalBatch", "Crystalformer", "CrystalformerConfig", "ImageTable", "InvalidCrystalError",
    "collate", "count_parameters", "image_table", "table_cutoff", "__version__",
]
