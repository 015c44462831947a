"""`mtdist make-shards` on a fake ImageNet tree of real JPEGs: sets, splits, bytes, re-runs, errors."""

from __future__ import annotations

import collections
import hashlib
import io
import shutil
from pathlib import Path

import pytest
import torch
from imagenet_tree import make_imagenet_tree
from PIL import Image

from mtdist import cli
from mtdist.data import ImagenetEvalTransform, ShardStream, decode_image, read_index, resolve_shards
from mtdist.data.make_shards import MakeShardsOptions, SourceError, make_shards
from mtdist.data.stream import read_samples

CLASSES, PER_CLASS, VAL_PER_CLASS = 10, 12, 3


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """10 classes x 12 train images, val in class folders (3 per class)."""
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet"), CLASSES, PER_CLASS, VAL_PER_CLASS)


@pytest.fixture(scope="module")
def flat_tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """10 classes x 6 train images, flat val (3 per class) with the devkit's ground truth file."""
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet_flat"), CLASSES, 6, 3, val_layout="flat")


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """10 classes x 50 train images, flat val with the devkit's ground truth file."""
    return make_imagenet_tree(tmp_path_factory.mktemp("imagenet_big"), 10, 50, 5, val_layout="flat")


def _run(tree: dict, out: Path, **options):
    kw = dict(samples_per_shard=16, workers=1, progress=False)
    return make_shards(MakeShardsOptions(src=tree["root"], out=out, **(kw | options)))


def _read_set(out: Path, prefix: str) -> tuple[dict, list[list[dict]]]:
    """The set's index and its shards' samples, read back through the stream's tar reader."""
    index = read_index(out / f"{prefix}.index.json")
    return index, [list(read_samples([str(out / e["name"])])) for e in index["shards"]]


def _keys(shards: list[list[dict]]) -> list[str]:
    return [s["__key__"] for shard in shards for s in shard]


def _tree_files(out: Path) -> dict[str, str]:
    """sha256 of every shard and index file in `out`."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.*")) if p.is_file()
    }


# ----------------------------------------------------------------------------------------- sets, samples
def test_sets_counts_keys_and_labels(tree: dict, tmp_path: Path) -> None:
    report = _run(tree, tmp_path, labels_per_class=2)
    assert set(report.indexes) == {"train-labeled", "train-unlabeled", "val"}
    sizes = {"train-labeled": 2 * CLASSES, "train-unlabeled": (PER_CLASS - 2) * CLASSES, "val": 30}
    keys = {}
    for prefix, size in sizes.items():
        index, shards = _read_set(tmp_path, prefix)
        assert index["num_samples"] == size == len(_keys(shards))
        assert [e["num_samples"] for e in index["shards"]] == [len(s) for s in shards]
        assert [len(s) for s in shards] == [16] * (size // 16) + ([size % 16] if size % 16 else [])
        assert index["classes"] == tree["wnids"] and index["num_classes"] == CLASSES
        for entry in index["shards"]:
            shard = tmp_path / entry["name"]
            assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
            assert entry["num_bytes"] == shard.stat().st_size
        samples = [s for shard in shards for s in shard]
        truth = tree["val"] if prefix == "val" else tree["train"]
        for s in samples:  # keys are file stems; wnid and class index agree with the folder
            assert s["wnid"].decode() == truth[s["__key__"]]
            assert int(s["cls"]) == tree["wnids"].index(truth[s["__key__"]])
        # the seeded shuffle mixes classes: no shard holds a single class
        assert all(len({s["cls"] for s in shard}) > 1 for shard in shards if len(shard) > 1)
        keys[prefix] = _keys(shards)
    per_class = collections.Counter(tree["train"][k] for k in keys["train-labeled"])
    assert sorted(per_class.values()) == [2] * CLASSES
    assert not set(keys["train-labeled"]) & set(keys["train-unlabeled"])
    assert set(keys["train-labeled"]) | set(keys["train-unlabeled"]) == set(tree["train"])
    assert set(keys["val"]) == set(tree["val"])


def test_bytes_kept_and_special_files_come_out_rgb(tree: dict, tmp_path: Path) -> None:
    _run(tree, tmp_path)  # no split: one "train" set
    index, shards = _read_set(tmp_path, "train")
    samples = {s["__key__"]: s for shard in shards for s in shard}
    assert set(samples) == set(tree["train"])
    converted = {c["key"]: c["reason"] for c in index["converted"]}
    assert converted == {tree["cmyk"][0]: "CMYK JPEG", tree["png"][0]: "PNG (RGB) file named .JPEG"}
    for key, sample in samples.items():
        source = tree["files"][key].read_bytes()
        if key not in converted:  # RGB and grayscale JPEGs: the file's own bytes, not re-encoded
            assert sample["jpg"] == source
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert img.format == "JPEG" and img.mode == ("L" if key in tree["grayscale"] else "RGB")
    for key in tree["grayscale"] + tree["cmyk"] + tree["png"]:
        source = decode_image(tree["files"][key].read_bytes(), 3)  # the reader copes with the files as is
        stored = decode_image(samples[key]["jpg"], 3)
        assert source.shape == stored.shape and source.shape[0] == 3 and stored.dtype == torch.uint8
        # a conversion is the reader's own RGB image, JPEG-compressed at quality 95
        assert (source.float() - stored.float()).abs().mean() < 4.0


def test_label_fraction_and_unlabeled_includes_labeled(tree: dict, tmp_path: Path) -> None:
    _run(tree, tmp_path, label_fraction=0.25, split_seed=3, unlabeled_includes_labeled=True)
    labeled = _keys(_read_set(tmp_path, "train-labeled")[1])
    unlabeled = _keys(_read_set(tmp_path, "train-unlabeled")[1])
    assert sorted(collections.Counter(tree["train"][k] for k in labeled).values()) == [3] * CLASSES
    assert sorted(unlabeled) == sorted(tree["train"])  # every train image, the labeled ones too


def test_labels_file_in_the_papers_format(tree: dict, tmp_path: Path) -> None:
    chosen = {k: w for k, w in tree["train"].items() if int(k.split("_")[1]) % 3 == 0}
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{k}.JPEG {w}\n" for k, w in chosen.items()))
    _run(tree, tmp_path / "out", labels_file=labels)
    labeled = _keys(_read_set(tmp_path / "out", "train-labeled")[1])
    unlabeled = _keys(_read_set(tmp_path / "out", "train-unlabeled")[1])
    assert sorted(labeled) == sorted(chosen)
    assert sorted(unlabeled) == sorted(set(tree["train"]) - set(chosen))


def test_max_shard_bytes(tree: dict, tmp_path: Path) -> None:
    limit = 40_000
    _run(tree, tmp_path, samples_per_shard=0, max_shard_bytes=limit)
    index, shards = _read_set(tmp_path, "train")
    assert len(shards) > 3 and index["num_samples"] == CLASSES * PER_CLASS
    for entry, shard in zip(index["shards"], shards, strict=True):
        size = (tmp_path / entry["name"]).stat().st_size
        assert size <= limit or len(shard) == 1  # only a converted or lone image may pass it
    sizes = [e["num_bytes"] for e in index["shards"][:-1]]
    assert sum(sizes) / len(sizes) > limit / 2  # and shards are filled, not one image each


# ------------------------------------------------------------------------- parallel, re-runs, repairs
def test_workers_give_identical_shards(big_tree: dict, tmp_path: Path) -> None:
    for workers in (1, 2):
        _run(
            big_tree,
            tmp_path / f"w{workers}",
            labels_per_class=5,
            workers=workers,
            synsets=big_tree["synsets"],
        )
    one, two = _tree_files(tmp_path / "w1"), _tree_files(tmp_path / "w2")
    assert one == two and len([n for n in one if n.endswith(".tar")]) == 4 + 29 + 4


def test_rerun_keeps_complete_shards(tree: dict, tmp_path: Path) -> None:
    first = _run(tree, tmp_path, labels_per_class=2)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    before = _tree_files(tmp_path)
    again = _run(tree, tmp_path, labels_per_class=2)
    assert again.written == [] and again.kept == sorted(first.written)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == mtimes
    assert _tree_files(tmp_path) == before


def test_partial_and_corrupt_shards_are_rewritten(tree: dict, tmp_path: Path) -> None:
    _run(tree, tmp_path)
    before = _tree_files(tmp_path)
    # an interrupted write: the temporary file is there, the shard is not
    (tmp_path / "train-000001.tar").unlink()
    (tmp_path / "train-000001.tar.partial").write_bytes(b"half a tar")
    # a damaged shard of the same size: one byte of an image flipped
    damaged = tmp_path / "train-000004.tar"
    data = bytearray(damaged.read_bytes())
    data[5000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = _run(tree, tmp_path)
    assert report.written == ["train-000001.tar", "train-000004.tar"]
    assert not (tmp_path / "train-000001.tar.partial").exists()
    assert _tree_files(tmp_path) == before


def test_changed_plan_rewrites_shards(tree: dict, tmp_path: Path) -> None:
    _run(tree, tmp_path, shuffle_seed=0)
    first = _keys(_read_set(tmp_path, "train")[1])
    report = _run(tree, tmp_path, shuffle_seed=1)  # the same shard names, other samples in them
    assert report.kept == [] and len(report.written) == 8 + 2
    second = _keys(_read_set(tmp_path, "train")[1])
    assert second != first and sorted(second) == sorted(first)


# --------------------------------------------------------------------------------------------- val
def test_flat_val_with_the_devkit_ground_truth(flat_tree: dict, tmp_path: Path) -> None:
    # the ground truth file is found under the root; --synsets maps its ILSVRC ids to wnids
    _run(flat_tree, tmp_path / "gt", synsets=flat_tree["synsets"])
    _run(flat_tree, tmp_path / "labels", val_labels=flat_tree["val_labels"])
    for out in ("gt", "labels"):
        _, shards = _read_set(tmp_path / out, "val")
        got = {s["__key__"]: (s["wnid"].decode(), int(s["cls"])) for shard in shards for s in shard}
        assert got == {k: (w, flat_tree["wnids"].index(w)) for k, w in flat_tree["val"].items()}
    index_gt, index_labels = (_tree_files(tmp_path / out)["val.index.json"] for out in ("gt", "labels"))
    assert index_gt == index_labels
    with pytest.raises(SourceError, match="--synsets"):
        _run(flat_tree, tmp_path / "no_synsets")
    wrong = tmp_path / "ground_truth.txt"
    wrong.write_text("1\n" * 5)
    with pytest.raises(SourceError, match=rf"{wrong} has 5 labels but .* 30 images"):
        _run(flat_tree, tmp_path / "wrong", synsets=flat_tree["synsets"], val_ground_truth=wrong)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_file(tree: dict, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=str(tmp_path / "nowhere")):
        make_shards(MakeShardsOptions(src=tmp_path / "nowhere", out=tmp_path / "out"))
    labels = tmp_path / "labels.txt"
    labels.write_text(f"{next(iter(tree['train']))}.JPEG {tree['wnids'][0]}\nn99999999_1.JPEG n99999999\n")
    with pytest.raises(SourceError, match=rf"{labels}.*n99999999_1"):
        _run(tree, tmp_path / "out", labels_file=labels)
    with pytest.raises(SourceError, match="another wnid than their folder"):
        key = next(k for k, w in tree["train"].items() if w != tree["wnids"][0])
        labels.write_text(f"{key}.JPEG {tree['wnids'][0]}\n")
        _run(tree, tmp_path / "out", labels_file=labels)


def test_empty_class_folder_and_unreadable_file(tree: dict, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tree["root"] / "train", src / "train")
    (src / "train" / "n00000001").mkdir()
    with pytest.raises(SourceError, match=str(src / "train" / "n00000001")):
        make_shards(MakeShardsOptions(src=src, out=tmp_path / "out", progress=False))
    (src / "train" / "n00000001").rmdir()
    bad_key = next(k for k in tree["train"] if k not in tree["cmyk"] + tree["png"] + tree["grayscale"])
    bad = src / "train" / tree["train"][bad_key] / f"{bad_key}.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    with pytest.raises(SourceError, match=rf"{bad}.*--skip-bad"):
        make_shards(MakeShardsOptions(src=src, out=tmp_path / "out", workers=2, progress=False))
    make_shards(MakeShardsOptions(src=src, out=tmp_path / "out", skip_bad=True, progress=False))
    index, shards = _read_set(tmp_path / "out", "train")
    assert [s["key"] for s in index["skipped"]] == [bad_key] and "truncated" in index["skipped"][0][
        "reason"
    ].lower()
    assert index["num_samples"] == len(_keys(shards)) == CLASSES * PER_CLASS - 1
    assert bad_key not in _keys(shards)


def test_cli(tree: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["make-shards", "--src", str(tree["root"]), "--out", str(tmp_path), "--no-progress"]
    assert cli.main([*args, "--labels-per-class", "3", "--samples-per-shard", "32", "--workers", "2"]) == 0
    assert "train-labeled: 30 samples in 1 shards" in capsys.readouterr().out
    assert read_index(tmp_path / "train-unlabeled.index.json")["num_samples"] == 90
    assert cli.main([*args[:2], str(tmp_path / "nowhere"), *args[3:]]) == 2
    assert f"{tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    args[4] = str(tmp_path / "by_bytes")
    assert cli.main([*args, "--max-shard-bytes", "40K", "--workers", "1"]) == 0
    index = read_index(tmp_path / "by_bytes" / "train.index.json")
    assert len(index["shards"]) > 3 and max(e["num_bytes"] for e in index["shards"]) <= 40 * 1024


# ------------------------------------------------------------------------------------ shard sources
def test_stream_reads_pipe_urls_and_brace_patterns(tree: dict, tmp_path: Path) -> None:
    _run(tree, tmp_path, labels_per_class=4, samples_per_shard=10)
    index = read_index(tmp_path / "train-labeled.index.json")
    want = {s["__key__"]: int(s["cls"]) for shard in _read_set(tmp_path, "train-labeled")[1] for s in shard}
    assert len(index["shards"]) == 4
    specs = {
        "pipe": ",".join(f"pipe:cat {tmp_path / e['name']}" for e in index["shards"]),
        "brace": str(tmp_path / "train-labeled-{000000..000003}.tar"),
    }
    for spec in specs.values():
        urls = resolve_shards(spec)
        assert len(urls) == 4
        stream = ShardStream(
            urls,
            rank=0,
            world_size=1,
            seed=0,
            transform=ImagenetEvalTransform(64, 56),
            channels=3,
            views=2,
            labeled=True,
            infinite=False,
        )
        got = {}
        for student, teacher, label, key in stream:
            assert student.shape == teacher.shape == (3, 56, 56)
            got[key] = label
        assert got == want
