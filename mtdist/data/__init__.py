"""The data path: packaged datasets, label splits, tar shards, transforms, streams and loaders.

webdataset is imported only inside this package.
"""

from .decode import decode_image
from .imagenet_folder import SourceError
from .loader import DataCounts, EvalBatches, TrainBatches, build_eval_loader, build_train_loader
from .make_shards import MakeShardsOptions, make_shards
from .packaged import load_digits, load_mnist5k
from .presets import make_transforms
from .shards import read_index, resolve_shards, shard_sample_counts, write_array_dataset, write_shards
from .split import fraction_per_class, split_per_class
from .stream import DataError, ErrorBound, ShardStream, check_readers, shard_order
from .transforms import DigitsAugment, ImagenetEvalTransform, ImagenetTrainAugment, Transform

__all__ = [
    "DataCounts",
    "DataError",
    "DigitsAugment",
    "ErrorBound",
    "EvalBatches",
    "ImagenetEvalTransform",
    "ImagenetTrainAugment",
    "MakeShardsOptions",
    "ShardStream",
    "SourceError",
    "TrainBatches",
    "Transform",
    "build_eval_loader",
    "build_train_loader",
    "check_readers",
    "decode_image",
    "fraction_per_class",
    "load_digits",
    "load_mnist5k",
    "make_shards",
    "make_transforms",
    "read_index",
    "resolve_shards",
    "shard_order",
    "shard_sample_counts",
    "split_per_class",
    "write_array_dataset",
    "write_shards",
]
