"""Corrupt data in the shard stream: skipped, counted exactly, reported, bounded, never a hang.

Real webdataset tars in tmp_path (good samples written with mtdist's shard writer), corrupted the way
real ones are: garbage and truncated image bytes, a missing or out-of-range label, a tar cut off
mid-sample or at a member boundary, a 0-byte file, a tar with no members. Every test that could spin
forever on a regression runs under a SIGALRM guard, so it fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset
from conftest import TINY
from PIL import Image

from mtdist.config import ConfigError, load_config_dict
from mtdist.data import (
    DataError,
    DigitsAugment,
    ErrorBound,
    ShardStream,
    build_eval_loader,
    build_train_loader,
    resolve_shards,
    write_shards,
)
from mtdist.data.shards import encode_png
from mtdist.data.stream import read_samples
from mtdist.dist import DistEnv
from mtdist.inputs import build_train_batches, check_eval_shards
from mtdist.logger import read_metrics
from mtdist.train import data_error_metrics

SIZE, NUM_CLASSES = 8, 3
EVAL = DigitsAugment(0, 0.0, mean=0.0, std=1.0)
TRAIN = DigitsAugment(1, 0.1, mean=0.0, std=1.0)  # batched: exercises the per-batch seeding
NO_BOUND = ErrorBound(max_fraction=1.0, min_samples=0)


@contextlib.contextmanager
def alarm(seconds: int = 60) -> Iterator[None]:
    """Fail (rather than hang) if the body runs longer than `seconds`."""

    def fail(*_) -> None:
        raise TimeoutError(f"still running after {seconds} s: the stream spins instead of raising")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------- shards
def _good(key: str, seed: int) -> dict:
    image = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    return {"__key__": key, "png": encode_png(image), "cls": seed % NUM_CLASSES}


def _good_shards(out: Path, prefix: str, n: int, per_shard: int, first_seed: int = 0) -> list[str]:
    samples = [_good(f"{prefix}{i:03d}", first_seed + i) for i in range(n)]
    return [str(p) for p in write_shards(samples, out, prefix, per_shard)]


def _tar(path: Path, samples: list[dict]) -> str:
    """A tar of raw fields (bytes), written as webdataset writes them, whatever they hold."""
    with open(path, "wb") as f, webdataset.TarWriter(f, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    return str(path)


def _raw(sample: dict) -> dict:
    return {"__key__": sample["__key__"], "png": sample["png"], "cls": str(sample["cls"]).encode()}


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _cut(path: str, member: int, into_data: int) -> None:
    """Truncate a tar `into_data` bytes into the data of its `member`-th member (0-based)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset_data + into_data
    with open(path, "r+b") as f:
        f.truncate(offset)


# Bad samples, each in a shard of its own between two good samples: (fields, reason logged).
BAD_SAMPLES = {
    "garbage_jpg": ({"jpg": b"this is not a jpeg" * 4, "cls": b"1"}, "UnidentifiedImageError"),
    "truncated_jpg": ({"jpg": _jpeg(0)[:300], "cls": b"1"}, "OSError"),
    "missing_cls": ({"jpg": _jpeg(1)}, "no 'cls' label"),
    "cls_out_of_range": ({"jpg": _jpeg(2), "cls": str(NUM_CLASSES).encode()}, "label 3 is outside [0, 3)"),
    "negative_cls": ({"jpg": _jpeg(3), "cls": b"-1"}, "label -1 is outside"),
    "cls_not_a_number": ({"jpg": _jpeg(4), "cls": b"cat"}, "invalid literal for int"),
    "no_image": ({"cls": b"1"}, "none of ('jpg', 'jpeg', 'png')"),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per case: the shard url, its index count (None: not indexed), corrupt samples, good keys."""
    out = tmp_path_factory.mktemp("corrupt")
    found: dict[str, tuple[str, int | None, int, list[str]]] = {}
    for name, (fields, _) in BAD_SAMPLES.items():
        samples = [
            _raw(_good(f"{name}-a", 1)),
            {"__key__": f"{name}-bad", **fields},
            _raw(_good(f"{name}-b", 2)),
        ]
        found[name] = (_tar(out / f"{name}.tar", samples), 3, 1, [f"{name}-a", f"{name}-b"])
    six = [_raw(_good(f"t{i}", i)) for i in range(6)]  # members: t0.cls t0.png t1.cls ...
    for indexed in (True, False):
        # Cut inside t3's png: t0..t2 read, then a ReadError; t3..t5 lost (by the index: 3, else 1).
        url = _tar(out / f"cut_mid_{indexed}.tar", six)
        _cut(url, member=7, into_data=10)
        found[f"cut_mid_sample_{indexed}"] = (
            url,
            6 if indexed else None,
            3 if indexed else 1,
            ["t0", "t1", "t2"],
        )
    # Cut right after t3's png (a member boundary): the tar ends cleanly with 4 samples of 6.
    url = _tar(out / "cut_boundary.tar", six)
    with tarfile.open(url) as tar:
        end = tar.getmembers()[7].offset_data + 512
    Path(url).write_bytes(Path(url).read_bytes()[:end])
    found["cut_at_boundary_indexed"] = (url, 6, 2, ["t0", "t1", "t2", "t3"])
    # Cut between t4's cls and its png: t4 comes out without an image (a corrupt sample).
    url = _tar(out / "cut_partial.tar", six)
    with tarfile.open(url) as tar:
        end = tar.getmembers()[9].offset
    Path(url).write_bytes(Path(url).read_bytes()[:end])
    found["cut_leaving_a_partial_sample"] = (url, None, 1, ["t0", "t1", "t2", "t3"])
    (out / "zero.tar").write_bytes(b"")
    found["zero_bytes_indexed"] = (str(out / "zero.tar"), 5, 5, [])
    found["zero_bytes"] = (str(out / "zero.tar"), None, 1, [])
    url = _tar(out / "no_members.tar", [])
    found["no_members_indexed"] = (url, 4, 4, [])
    found["no_members"] = (url, None, 1, [])
    return {"out": out, "good": _good_shards(out, "g", 6, 6), "found": found}


def _stream(urls: list[str], counts: dict[str, int] | None = None, **overrides) -> ShardStream:
    kw = dict(rank=0, world_size=1, seed=0, transform=EVAL, channels=1, views=1, labeled=True)
    kw |= dict(infinite=False, num_classes=NUM_CLASSES, error_bound=NO_BOUND, report_skipped=True)
    return ShardStream(urls, sample_counts=counts, **(kw | overrides))


# ---------------------------------------------------------------------------------------------- each case
@pytest.mark.parametrize(
    "case",
    [*BAD_SAMPLES, "cut_mid_sample_True", "cut_mid_sample_False", "cut_at_boundary_indexed",
     "cut_leaving_a_partial_sample", "zero_bytes_indexed", "zero_bytes", "no_members_indexed", "no_members"],
)  # fmt: skip
def test_each_corrupt_case_is_skipped_and_counted(cases: dict, case: str) -> None:
    url, count, errors, good_keys = cases["found"][case]
    urls = [cases["good"][0], url]
    counts = {cases["good"][0]: 6} | ({url: count} if count is not None else {})
    with alarm():
        out = list(_stream(urls, counts))
    keys = [s[-2] for s in out]
    assert sorted(keys) == sorted([f"g{i:03d}" for i in range(6)] + good_keys)  # every good one, once
    assert sum(s[-1] for s in out) == errors


def test_corrupt_samples_are_logged_with_shard_key_and_reason(
    cases: dict, caplog: pytest.LogCaptureFixture
) -> None:
    urls = [cases["found"][name][0] for name in BAD_SAMPLES]
    with caplog.at_level(logging.WARNING, logger="mtdist.data.stream"):
        out = list(_stream(urls, shuffle_buffer=0))
    assert sum(s[-1] for s in out) == len(BAD_SAMPLES)
    lines = [r.getMessage() for r in caplog.records if "skipped a corrupt sample" in r.getMessage()]
    assert len(lines) == 5  # the first 5 per reader one line each ...
    for line in lines:
        [name] = [name for name in BAD_SAMPLES if f"sample '{name}-bad'" in line]
        assert (
            f"shard {cases['found'][name][0]}, sample '{name}-bad': " in line and BAD_SAMPLES[name][1] in line
        )
    # ... then the epoch's summary, with the count and the last one
    assert "skipped 7 corrupt samples in epoch 0 (7 of 21 read since the start; last: shard" in caplog.text


def test_a_truncated_tar_is_logged_once_with_what_was_lost(
    cases: dict, caplog: pytest.LogCaptureFixture
) -> None:
    url, count, *_ = cases["found"]["cut_mid_sample_True"]
    with caplog.at_level(logging.WARNING, logger="mtdist.data.stream"):
        list(_stream([url], {url: count}))
    assert caplog.text.count(f"shard {url}: ReadError: unexpected end of data: 3 samples read, 3 lost") == 1


def test_eval_loader_counts_corrupt_samples_over_workers(cases: dict) -> None:
    names = ["garbage_jpg", "missing_cls", "cut_mid_sample_False", "no_members", "cls_out_of_range"]
    urls = cases["good"] + [cases["found"][n][0] for n in names]
    loader = build_eval_loader(
        urls, batch_size=4, rank=0, world_size=1, transform=EVAL, channels=1, num_workers=2,
        num_classes=NUM_CLASSES, error_bound=NO_BOUND,
    )  # fmt: skip
    with alarm():
        for _ in range(2):  # persistent workers: the second pass counts afresh
            keys = [k for _, _, batch_keys in loader for k in batch_keys]
            assert sorted(keys) == sorted(
                [f"g{i:03d}" for i in range(6)] + sum((cases["found"][n][3] for n in names), [])
            )
            assert loader.errors == 1 + 1 + 1 + 1 + 1


# ---------------------------------------------------------------------------------------------- the bound
def test_the_first_bad_sample_does_not_stop_a_run(cases: dict) -> None:
    urls = [cases["good"][0], cases["found"]["garbage_jpg"][0]]
    out = list(_stream(urls, error_bound=ErrorBound(max_fraction=0.01, min_samples=1000)))
    assert sum(s[-1] for s in out) == 1  # 1 of 9 is over 1%, but 9 samples are too few to judge


def test_a_fraction_over_the_bound_stops_naming_the_shard(cases: dict) -> None:
    url = cases["found"]["truncated_jpg"][0]
    stream = _stream([cases["good"][0], url], error_bound=ErrorBound(max_fraction=0.1, min_samples=5))
    with pytest.raises(DataError) as raised:
        list(stream)
    message = str(raised.value)
    assert f"shard {url}, sample 'truncated_jpg-bad'" in message
    assert "skipped 1 corrupt of " in message and "> data.max_error_fraction 0.1" in message


def test_over_the_bound_in_a_loader_worker_reaches_the_main_process_readable(cases: dict) -> None:
    bad = cases["found"]["cls_out_of_range"][0]
    labeled = [cases["good"][0], bad]
    unlabeled = _good_shards(cases["out"], "u", 12, 6, first_seed=100)
    batches = _train(labeled, unlabeled, num_workers=2, error_bound=ErrorBound(0.0, 0))
    with (
        alarm(),
        contextlib.closing(batches),  # now, not in 5 s per worker from the garbage collector
        pytest.raises(DataError, match=rf"shard {re.escape(bad)}, sample 'cls_out_of_range-bad': .*label 3"),
    ):
        list(itertools.islice(batches, 20))


def test_a_reader_with_no_usable_sample_raises_instead_of_spinning(cases: dict) -> None:
    junk = [{"__key__": f"x{i}", "jpg": b"junk", "cls": b"0"} for i in range(3)]
    bad = [_tar(cases["out"] / "all-bad.tar", junk), cases["found"]["zero_bytes"][0]]
    with (
        alarm(),
        pytest.raises(DataError, match=r"read no usable sample in epoch 0 from its shards .*all-bad\.tar"),
    ):
        next(iter(_stream(bad, infinite=True, error_bound=ErrorBound())))  # 4 errors: too few for the bound
    # In a worker of the train loader: the reader whose shards are all bad stops the run.
    labeled = [cases["good"][0], bad[0]]
    batches = _train(labeled, [], num_workers=2, unlabeled_per_gpu=0)
    with (
        alarm(),
        contextlib.closing(batches),
        pytest.raises(DataError, match=r"read no usable sample in epoch 0 .*all-bad\.tar"),
    ):
        list(itertools.islice(batches, 50))


def test_a_process_stopped_by_a_worker_error_exits(tmp_path: Path) -> None:
    # Loader workers ignore SIGTERM (stop signals are the main process's); multiprocessing's exit hook
    # would SIGTERM and then join them forever. The run must end with the DataError, not hang.
    urls = _good_shards(tmp_path, "p", 20, 5)
    Path(urls[1]).write_bytes(b"")
    script = f"""
import itertools
from mtdist.data import DigitsAugment, build_train_loader
loader = build_train_loader({urls[:2]!r}, {urls[2:]!r}, labeled_per_gpu=2, unlabeled_per_gpu=2, rank=0,
    world_size=1, seed=0, transform=DigitsAugment(0, 0.0, mean=0.0, std=1.0), channels=1, num_workers=2)
list(itertools.islice(loader, 50))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert (
        proc.stderr.rstrip()
        .splitlines()[-1]
        .startswith("mtdist.data.stream.DataError: reader 1 (rank 0, worker 1)")
    )
    assert "killed by signal" not in proc.stderr


def test_shards_counted_empty_raise_instead_of_spinning(cases: dict) -> None:
    url = cases["found"]["no_members"][0]
    with alarm(), pytest.raises(DataError, match=r"read no usable sample in epoch 0"):
        next(iter(_stream([url], {url: 0}, infinite=True)))
    with alarm(), pytest.raises(DataError, match=r"hold no samples"):
        next(iter(_stream([url], {url: 0}, infinite=True, start_batch=5)))  # passing over empty epochs


# ------------------------------------------------------------------------------------------ before training
def test_missing_shards_and_empty_lists_are_errors_before_iteration(cases: dict, tmp_path: Path) -> None:
    _good_shards(tmp_path, "missing", 2, 2)  # missing-000000.tar only
    with pytest.raises(FileNotFoundError, match=r"missing-000001\.tar does not exist"):
        resolve_shards(str(tmp_path / "missing-{000000..000001}.tar"))
    with pytest.raises(ValueError, match="names no shards"):
        resolve_shards(str(tmp_path / "none-*.tar"))
    with pytest.raises(ValueError, match="at least one shard url"):
        ShardStream([], rank=0, world_size=1, seed=0, transform=EVAL, channels=1, views=1, labeled=True,
                    infinite=True)  # fmt: skip
    with pytest.raises(ValueError, match="0 shards for 1 readers"):
        _train([], cases["good"])
    with pytest.raises(ValueError, match="0 shards for 2 readers"):
        build_eval_loader([], batch_size=2, rank=0, world_size=1, transform=EVAL, channels=1, num_workers=2)


def test_the_train_wiring_checks_every_split_before_training(cases: dict, tmp_path: Path) -> None:
    good = ",".join(cases["good"])
    cfg = _cfg(labeled=good, unlabeled=good, val=str(tmp_path / "val-{0..1}.tar"))
    env = DistEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0)
    with pytest.raises(ConfigError, match=r"^data\.val: shard .*val-0\.tar does not exist"):
        check_eval_shards(cfg, env)
    plan = SimpleNamespace(labeled_per_gpu=2, unlabeled_per_gpu=2)
    with pytest.raises(ConfigError, match=r"^data\.labeled: shard .*nope\.tar does not exist"):
        build_train_batches(_cfg(labeled=str(tmp_path / "nope.tar"), unlabeled=good), env, plan)


def test_a_shard_missing_while_streaming_stops_the_run(tmp_path: Path) -> None:
    # Gone after the start (or a failing pipe:): not corrupt data to count, an error.
    urls = _good_shards(tmp_path, "gone", 4, 2)
    stream = _stream(urls, shuffle_buffer=0)
    Path(urls[1]).unlink()
    with pytest.raises(FileNotFoundError):
        list(stream)
    with pytest.raises(OSError, match="exit 1"):
        list(_stream([f"pipe:cat {urls[1]}"]))


# ---------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def corrupt_sets(cases: dict) -> dict:
    """Labeled: 3 shards, one with a bad label. Unlabeled: 6 shards of 6 with garbage images, a tar cut
    mid-sample, a 0-byte file and an empty tar among them (each indexed as holding 6 samples)."""
    out = cases["out"] / "sets"
    out.mkdir()
    samples = [_raw(_good(f"l{s}{i}", 10 * s + i)) for s in range(3) for i in range(5)]
    samples[7]["cls"] = b"7"  # l12: a label outside [0, 3)
    labeled = [_tar(out / f"lab{s}.tar", samples[5 * s : 5 * s + 5]) for s in range(3)]
    samples = [_raw(_good(f"u{s}{i}", 100 + 10 * s + i)) for s in range(6) for i in range(6)]
    for i in (3, 8, 9, 20):
        samples[i] = {"__key__": samples[i]["__key__"], "jpg": b"garbage", "cls": b"0"}
    unlabeled = [_tar(out / f"unl{s}.tar", samples[6 * s : 6 * s + 6]) for s in range(6)]
    _cut(unlabeled[2], member=5, into_data=3)  # u22..u25 lost
    Path(unlabeled[4]).write_bytes(b"")
    _tar(Path(unlabeled[5]), [])
    counts = {url: 5 for url in labeled} | {url: 6 for url in unlabeled}
    return {"labeled": labeled, "unlabeled": unlabeled, "counts": counts}


def _train(labeled: list[str], unlabeled: list[str], **overrides):
    kw = dict(labeled_per_gpu=2, unlabeled_per_gpu=3, rank=0, world_size=1, seed=5, transform=TRAIN)
    kw |= dict(channels=1, num_workers=0, shuffle_buffer=4, num_classes=NUM_CLASSES, error_bound=NO_BOUND)
    return build_train_loader(labeled, unlabeled, **(kw | overrides))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_corrupt_samples_yields_the_uninterrupted_batches(
    corrupt_sets: dict, num_workers: int
) -> None:
    sets = [corrupt_sets["labeled"], corrupt_sets["unlabeled"]]
    kw = dict(num_workers=num_workers, sample_counts=corrupt_sets["counts"])
    starts, span = (3, 7, 10, 16), 5
    reference, made, states, totals = _train(*sets, **kw), [], {}, {}
    with alarm(120):
        for n in range(1, max(starts) + span + 1):
            made.append((next(reference), list(reference.keys)))
            states[n], totals[n] = reference.state_dict(n), reference.report(n).errors_total
    assert totals[max(starts) + span] > 10  # the spans cross corrupt samples in both streams
    for k in starts:
        resumed = _train(*sets, **kw, start_batch=k, skipped=states[k]["skipped"])
        assert resumed.report(k).errors_total == totals[k]
        with alarm(60):
            for j in range(k, k + span):
                batch = next(resumed)
                assert resumed.keys == made[j][1], f"start {k}: batch {j} has other samples"
                assert all(torch.equal(a, b) for a, b in zip(batch, made[j][0], strict=True)), f"batch {j}"
        assert resumed.state_dict(k + span) == states[k + span]
        assert resumed.report(k + span).errors_total == totals[k + span]


def test_a_resume_without_the_skipped_counts_is_off(corrupt_sets: dict) -> None:
    # The check that the counts matter: dropping them shifts the stream (so the test above has teeth).
    sets = [corrupt_sets["labeled"], corrupt_sets["unlabeled"]]
    reference = _train(*sets, sample_counts=corrupt_sets["counts"])
    keys = []
    for _ in range(13):
        next(reference)
        keys.append(list(reference.keys))
    assert sum(reference.state_dict(12)["skipped"]["unlabeled"]) > 0
    resumed = _train(*sets, sample_counts=corrupt_sets["counts"], start_batch=12)
    next(resumed)
    assert resumed.keys != keys[12]


def test_train_metrics_report_errors_per_interval_and_in_total(corrupt_sets: dict) -> None:
    batches = _train(corrupt_sets["labeled"], corrupt_sets["unlabeled"], sample_counts=corrupt_sets["counts"])
    run = SimpleNamespace(train_batches=batches, cfg=_cfg(), device=torch.device("cpu"))
    for _ in range(8):
        next(batches)
    first = data_error_metrics(run, 4)  # grad_accum_steps 2: 8 batches consumed
    state = batches.state_dict(8)
    total = sum(sum(v) for v in state["skipped"].values())
    assert first == {
        "data/errors": total,
        "data/errors_total": total,
        "data/error_fraction": total / (total + 40),
    }
    for _ in range(8):
        next(batches)
    second = data_error_metrics(run, 8)
    assert second["data/errors"] == second["data/errors_total"] - total > 0


def _cfg(**data: str):
    data = {"num_classes": NUM_CLASSES, "channels": 1, "augment": "digits", "image_size": SIZE} | data
    return load_config_dict({"data": data, "deepspeed": {"grad_accum_steps": 2}})


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_training_on_corrupt_shards_reports_and_resumes_exactly(mnist_shards: dict, tmp_path: Path) -> None:
    """`mtdist train` (one process, 2 loader workers) on shards with garbage images, a truncated tar, a
    bad label and a bad val image: the metrics count them, and a run stopped at step 3 and resumed
    ends bitwise where the uninterrupted one does, with the same data position."""
    shards = _corrupted_copy(mnist_shards, tmp_path / "shards")
    common = [f"data.{k}={v}" for k, v in shards.items()] + [
        "data.num_workers=2", "data.max_error_fraction=0.5", "data.error_fraction_min_samples=50",
        "logging.eval_interval_steps=3", "checkpoint.interval_steps=3", "deepspeed.bf16=false",
    ]  # fmt: skip
    for run, steps in (("a", 6), ("b", 3), ("b", 6)):
        cmd = [sys.executable, "-m", "mtdist", "train", "--config", str(TINY), *common]
        cmd += [f"logging.run_dir={tmp_path / run}", f"schedule.max_steps={steps}"]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {run: read_metrics(tmp_path / run) for run in "ab"}
    train = {run: {r["step"]: r for r in rows[run] if "train/loss_total" in r} for run in "ab"}
    assert train["a"][6]["train/loss_total"] == train["b"][6]["train/loss_total"]
    assert train["a"][6]["data/errors_total"] == train["b"][6]["data/errors_total"] > 0
    assert (
        train["a"][2]["data/errors"] + train["a"][4]["data/errors"] + train["a"][6]["data/errors"]
        == (train["a"][6]["data/errors_total"])
    )
    assert 0 < train["a"][6]["data/error_fraction"] < 0.5
    evals = [r for r in rows["a"] if "eval/data_errors" in r]
    assert evals and all(r["eval/data_errors"] == 1 and r["eval/count"] == 119 for r in evals)

    def position(run: str, step: int) -> dict:
        folder = tmp_path / run / "checkpoints" / f"step-{step:08d}"
        return torch.load(folder / "rank00000.pt", weights_only=True)["data"]

    assert position("a", 6) == position("b", 6)
    assert position("b", 3)["batches"] == 3 and sum(position("b", 3)["skipped"]["unlabeled"]) > 0  # used


def _corrupted_copy(shards: dict[str, str], out: Path) -> dict[str, str]:
    """The conftest MNIST shards, copied, with garbage images at 3 places in every unlabeled shard but
    one, that one cut in half, a label out of range in a labeled shard and a garbage val image."""
    out.mkdir()
    copied = {}
    for split, spec in shards.items():
        for url in [*resolve_shards(spec), spec]:
            (out / Path(url).name).write_bytes(Path(url).read_bytes())
        copied[split] = str(out / Path(spec).name)
    unlabeled = resolve_shards(copied["unlabeled"])
    for url in unlabeled[:-1]:
        _rewrite(url, {i: ("png", b"junk") for i in (0, 5, 9)})
    data = Path(unlabeled[-1]).read_bytes()
    Path(unlabeled[-1]).write_bytes(data[: len(data) // 2])
    _rewrite(resolve_shards(copied["labeled"])[2], {1: ("cls", b"12")})
    _rewrite(resolve_shards(copied["val"])[1], {2: ("png", b"junk")})
    return copied


def _rewrite(url: str, bad: dict[int, tuple[str, bytes]]) -> None:
    samples = [{k: v for k, v in s.items() if k != "__url__"} for s in read_samples([url])]
    for i, (field, value) in bad.items():
        samples[i][field] = value
    _tar(Path(url), samples)
