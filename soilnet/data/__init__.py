"""WebDataset shards -> pretraining batches: manifest checks, global sample order, decode, normalise, augment."""

from soilnet.data.loader import LoaderSpec, PretrainBatches, build_loader
from soilnet.data.manifest import DataError
from soilnet.data.order import BatchSizeError, batch_ids, micro_batch
from soilnet.data.shards import ShardSet, open_shards

__all__ = [
    "BatchSizeError",
    "DataError",
    "LoaderSpec",
    "PretrainBatches",
    "ShardSet",
    "batch_ids",
    "build_loader",
    "micro_batch",
    "open_shards",
]
