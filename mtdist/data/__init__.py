"""The data path: packaged datasets, label splits, tar shards, transforms, streams and loaders.

webdataset is imported only inside this package.
"""

from .loader import build_eval_loader, build_train_loader
from .packaged import load_digits, load_mnist5k
from .shards import read_index, resolve_shards, shard_sample_counts, write_array_dataset, write_shards
from .split import fraction_per_class, split_per_class
from .stream import ShardStream, check_readers, shard_order
from .transforms import (
    DigitsAugment,
    ImagenetEvalTransform,
    ImagenetTrainAugment,
    Transform,
    decode_image,
    make_transforms,
)

__all__ = [
    "DigitsAugment",
    "ImagenetEvalTransform",
    "ImagenetTrainAugment",
    "ShardStream",
    "Transform",
    "build_eval_loader",
    "build_train_loader",
    "check_readers",
    "decode_image",
    "fraction_per_class",
    "load_digits",
    "load_mnist5k",
    "make_transforms",
    "read_index",
    "resolve_shards",
    "shard_order",
    "shard_sample_counts",
    "split_per_class",
    "write_array_dataset",
    "write_shards",
]
