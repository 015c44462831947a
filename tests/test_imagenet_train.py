"""Issue 3's acceptance: an ImageNet-layout tree of real JPEGs -> `make-shards` -> the tiny model
trained from those shards by real DeepSpeed, 2 processes x 2 loader workers per stream.

Checks: every rank runs the same number of steps; within one pass over the unlabeled set no sample
is seen twice across all ranks and workers (by key), and every one is seen; the labeled set holds
exactly the asked count per class, and only its samples carry labels in the batches.
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
from conftest import TINY
from imagenet_tree import make_imagenet_tree
from test_train_deepspeed import torchrun

from mtdist.config import load_config
from mtdist.data import read_index
from mtdist.data.make_shards import MakeShardsOptions, make_shards
from mtdist.plan import dataset_sizes, make_plan

pytestmark = pytest.mark.slow

CLASSES, PER_CLASS, LABELS_PER_CLASS = 10, 50, 10
# 400 unlabeled in 16 shards of 25: each of the 4 readers (2 ranks x 2 workers) holds 100 samples,
# so one pass over the unlabeled set is 50 steps of 8 (4 per rank) and every reader ends its epoch
# exactly there: any key seen twice in those steps would be a split bug, not an uneven shard.
UNLABELED_PER_SHARD = 25


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("imagenet")
    tree = make_imagenet_tree(root / "src", classes=CLASSES, per_class=PER_CLASS, val_per_class=10)
    opts = MakeShardsOptions(
        src=root / "src", out=root / "shards", samples_per_shard=UNLABELED_PER_SHARD,
        labels_per_class=LABELS_PER_CLASS, split_seed=0, workers=2, progress=False,
    )  # fmt: skip
    report = make_shards(opts)
    return {"tree": tree, "indexes": {k: str(v) for k, v in report.indexes.items()}}


def _overrides(shards: dict, out) -> list[str]:  # noqa: ANN001
    idx = shards["indexes"]
    return [
        f"data.labeled={idx['train-labeled']}",
        f"data.unlabeled={idx['train-unlabeled']}",
        f"data.val={idx['val']}",
        "data.channels=3",
        "data.augment=imagenet",
        "data.image_size=32",
        "data.num_workers=2",
        "data.eval_batch_size_per_gpu=8",
        "logging.eval_interval_steps=0",
        "schedule.epochs=1",
        f"logging.run_dir={out}",
    ]


def test_labeled_count_per_class_as_asked(imagenet_shards):
    tree, idx = imagenet_shards["tree"], imagenet_shards["indexes"]
    assert read_index(idx["train-labeled"])["num_samples"] == CLASSES * LABELS_PER_CLASS
    assert read_index(idx["train-unlabeled"])["num_samples"] == CLASSES * (PER_CLASS - LABELS_PER_CLASS)
    labeled_keys = _keys_of(idx["train-labeled"])
    per_class = collections.Counter(tree["train"][k] for k in labeled_keys)
    assert per_class == {wnid: LABELS_PER_CLASS for wnid in tree["wnids"]}
    assert not labeled_keys & _keys_of(idx["train-unlabeled"])


def test_two_ranks_two_workers_one_pass_sees_each_unlabeled_sample_once(imagenet_shards, tmp_path):
    overrides = _overrides(imagenet_shards, tmp_path)
    cfg = load_config(TINY, overrides)
    plan = make_plan(cfg, 2, *dataset_sizes(cfg))
    assert plan.total_steps == plan.steps_per_epoch == 50  # one pass: 400 unlabeled / 8 per step
    torchrun([str(TINY.parent.parent / "tests" / "keys_worker.py"), str(TINY), str(tmp_path), *overrides])
    ranks = [json.loads((tmp_path / f"keys-rank{r}.json").read_text()) for r in range(2)]
    for rec in ranks:
        assert rec["steps"] == rec["teacher_updates"] == len(rec["batches"]) == 50
    labeled_keys = _keys_of(imagenet_shards["indexes"]["train-labeled"])
    unlabeled_keys = _keys_of(imagenet_shards["indexes"]["train-unlabeled"])
    seen = collections.Counter()
    for rec in ranks:
        for keys, labels in zip(rec["batches"], rec["labels"], strict=True):
            assert len(keys) == len(labels) == plan.labeled_per_gpu + plan.unlabeled_per_gpu
            lab, unl = keys[: plan.labeled_per_gpu], keys[plan.labeled_per_gpu :]
            assert set(lab) <= labeled_keys and all(label >= 0 for label in labels[: len(lab)])
            assert all(label == -1 for label in labels[len(lab) :])
            seen.update(unl)
    assert set(seen) == unlabeled_keys  # the whole unlabeled set in one pass ...
    assert max(seen.values()) == 1  # ... each sample once, over both ranks and all their workers


def _keys_of(index_path: str) -> set[str]:
    from mtdist.data import resolve_shards
    from mtdist.data.stream import read_samples

    return {s["__key__"] for s in read_samples(resolve_shards(index_path))}


def test_stop_after_k_steps_restore_next_batches_equal(imagenet_shards, tmp_path):
    """The data position of a checkpoint (batches consumed + samples dropped per reader) restores the
    ImageNet stream exactly: same keys and same augmented pixels, 2 loader workers per stream."""
    from mtdist.dist import DistEnv
    from mtdist.inputs import build_train_batches

    cfg = load_config(TINY, _overrides(imagenet_shards, tmp_path))
    env = DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=0)
    plan = make_plan(cfg, 2, *dataset_sizes(cfg))
    k, n = 7, 6
    whole = build_train_batches(cfg, env, plan)
    reference = [(next(whole), list(whole.keys)) for _ in range(k + n)]
    position = whole.state_dict(k)
    whole.close()
    resumed = build_train_batches(cfg, env, plan, position["batches"], position["skipped"])
    for batch, keys in reference[k:]:
        again = next(resumed)
        assert list(resumed.keys) == keys
        assert all(torch.equal(a, b) for a, b in zip(again, batch, strict=True))
    resumed.close()
