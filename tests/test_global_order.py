"""The global data order (issue 13): byte-offset index, world-size-free order, exactly-once evaluation.

The acceptance test runs the data layer in one process at 64 ranks x 10 loader workers (no model):
each (rank, worker) reader is a GlobalStream iterated as that worker would be.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mtdist.data import DigitsAugment, read_index, shard_sample_counts, write_array_dataset
from mtdist.data import stream as stream_module
from mtdist.data.order import GlobalOrder, eval_positions, step_positions
from mtdist.data.ordered import GlobalStream
from mtdist.data.seek import TarReader, index_shards, load_offsets, offsets_path, scan_offsets, write_offsets
from mtdist.data.stream import CorruptShardError, read_samples

EVAL = DigitsAugment(0, 0.0, mean=0.0, std=1.0)
UNLABELED, LABELED, VAL, GLOBAL_BATCH = 1000, 100, 90, 64


def _write(out: Path, prefix: str, n: int, per_shard: int, seed: int) -> str:
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 6, 6), dtype=np.uint8)
    write_array_dataset(
        images, np.arange(n) % 3, [f"{prefix}{i:05d}" for i in range(n)], out, prefix, per_shard
    )
    return str(out / f"{prefix}.index.json")


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Fewer shards than 640 readers everywhere: unlabeled 1000 in 8 shards, labeled 100 in 3, val 90 in 2."""
    out = tmp_path_factory.mktemp("global")
    return {
        "unlabeled": _write(out, "unl", UNLABELED, 125, 0),
        "labeled": _write(out, "lab", LABELED, 40, 1),
        "val": _write(out, "val", VAL, 50, 2),
    }


def _urls(spec: str) -> list[str]:
    base = Path(spec).parent
    return [str(base / e["name"]) for e in read_index(spec)["shards"]]


def _stream(spec: str, rank: int, world_size: int, **kw) -> GlobalStream:
    base = dict(seed=7, transform=EVAL, channels=1, views=2, labeled=False, infinite=True, shuffle_buffer=300)
    return GlobalStream(
        _urls(spec), rank=rank, world_size=world_size, sample_counts=shard_sample_counts(spec), **(base | kw)
    )


def _step_keys(spec: str, world_size: int, workers: int, steps: int, start: int = 0, **kw) -> list[list[str]]:
    """Keys of global steps start .. start + steps - 1, the ranks' batches concatenated in rank order,
    each rank's batches made by its `workers` loader workers in turn."""
    per_rank = GLOBAL_BATCH // world_size
    keys: list[list[str]] = [[] for _ in range(steps)]
    for rank in range(world_size):
        stream = _stream(spec, rank, world_size, batch_size=per_rank, start_batch=start, **kw)
        for worker in range(workers):
            samples = stream.reader_samples(worker, workers)
            for local in range(worker, steps, workers):
                batch = [next(samples)[-1] for _ in range(per_rank)]
                assert len(keys[local]) == rank * per_rank  # ranks fill their slices in order
                keys[local] += batch
    return keys


# ----------------------------------------------------------------------------------- byte-offset index
def test_offsets_match_the_sequential_read(sets: dict[str, str]) -> None:
    for url in _urls(sets["unlabeled"])[:3]:
        table, samples = load_offsets(url), list(read_samples([url], indexed=False))
        assert table[0].tolist() == [os.path.getsize(url), 0] and len(table) - 1 == len(samples)
        reader = TarReader()
        assert [reader.read(url, int(o), int(s)) for o, s in table[1:]] == samples


def test_an_older_shard_gets_its_table_on_first_use_or_by_command(sets: dict[str, str]) -> None:
    url = _urls(sets["labeled"])[0]
    table = np.load(offsets_path(url))
    offsets_path(url).unlink()
    _stream(sets["labeled"], 0, 1, batch_size=1)  # first use writes it
    assert np.array_equal(np.load(offsets_path(url)), table)
    offsets_path(url).unlink()
    assert index_shards(_urls(sets["labeled"])) == [f"{offsets_path(url)}: {len(table) - 1} samples"]
    assert np.array_equal(np.load(offsets_path(url)), table) and index_shards(_urls(sets["labeled"])) == []


def test_shards_without_tables_are_logged_and_read_with_a_beat_each(sets: dict[str, str], caplog) -> None:
    """Start-up on shards lacking `.idx.npy`: one warning naming `mtdist index-shards`, and the watchdog's
    beat (`progress`) before each shard's read, through the eval loader too; none once they have tables."""
    from mtdist.data import build_eval_loader

    urls, beats = _urls(sets["val"]), []
    for url in urls:
        offsets_path(url).unlink()
    with caplog.at_level("WARNING", logger="mtdist.data.ordered"):
        build_eval_loader(
            urls, batch_size=7, rank=0, world_size=1, transform=EVAL, channels=1, num_workers=0,
            order="global", progress=beats.append,
        )  # fmt: skip
    assert len(beats) == len(urls) and all(url in beat for url, beat in zip(urls, beats, strict=True))
    assert f"{len(urls)} of {len(urls)} shards" in caplog.text and "mtdist index-shards SPEC" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtdist.data.ordered"):
        _stream(sets["val"], 0, 1, batch_size=1, progress=beats.append)  # the tables were written
    assert not caplog.text and len(beats) == 2 * len(urls)


def test_a_reader_starts_inside_a_shard_with_one_read(sets: dict[str, str], monkeypatch) -> None:
    stream = _stream(sets["unlabeled"], 3, 8, batch_size=8, start_batch=37)
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(off) or real(fd, n, off))
    next(stream.reader_samples(0, 1))
    assert len(reads) == 1 and reads[0] > 0


def test_a_truncated_tar_keeps_only_whole_samples(sets: dict[str, str], tmp_path: Path) -> None:
    data = Path(_urls(sets["val"])[0]).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 700])
    sequential = []
    with pytest.raises(ValueError):  # CorruptShardError
        for sample in read_samples([str(cut)]):
            sequential.append(sample["__key__"])
    assert len(scan_offsets(str(cut))) - 1 == len(sequential)


def test_the_sequential_reader_reads_by_the_table_where_it_has_one(sets: dict[str, str], monkeypatch) -> None:
    urls = _urls(sets["unlabeled"])[:2]
    by_tar = list(read_samples(urls, indexed=False))
    monkeypatch.setattr(stream_module, "_tar_samples", _no_tar_reads)
    assert list(read_samples(urls)) == by_tar  # the same samples, and no tar parsed


def test_the_indexed_read_of_a_damaged_or_broken_tar(sets: dict[str, str], tmp_path: Path) -> None:
    url = _urls(sets["val"])[0]
    data = bytearray(Path(url).read_bytes())
    table = load_offsets(url)
    offset = int(table[3, 0])  # sample 2's first header: damaged in place, the tar keeps its size
    data[offset + 257 : offset + 262] = b"xxxxx"
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(data)
    write_offsets(str(damaged), table)
    samples = list(read_samples([str(damaged)]))
    assert [s["__key__"] for s in samples if "__lost__" not in s] == [
        s["__key__"] for i, s in enumerate(read_samples([url])) if i != 2
    ]
    assert "__lost__" in samples[2] and "does not read as a sample" in samples[2]["__lost__"]
    cut = tmp_path / "cut.tar"  # a table made of a tar that broke off: its whole samples, then the error
    cut.write_bytes(Path(url).read_bytes()[: len(data) // 2 + 700])
    write_offsets(str(cut))
    keys = []
    with pytest.raises(CorruptShardError, match="breaks off after its"):
        for sample in read_samples([str(cut)]):
            keys.append(sample["__key__"])
    assert keys == [s["__key__"] for s in read_samples([url])][: len(keys)] and len(keys) > 0


def _no_tar_reads(url: str):
    raise AssertionError(f"{url} was read as a tar although it has a current offset table")


# ----------------------------------------------------------------------------------- the global order
def test_the_order_is_a_block_shuffle_of_a_shard_permutation() -> None:
    order = GlobalOrder((5, 7, 3, 9), seed=1, block=6)
    ids = order.epoch_ids(0)
    assert sorted(ids.tolist()) == list(range(24)) and not np.array_equal(ids, order.epoch_ids(1))
    assert np.array_equal(ids, GlobalOrder((5, 7, 3, 9), seed=1, block=6).epoch_ids(0))
    unshuffled = GlobalOrder((5, 7, 3, 9), seed=1, block=1).epoch_ids(0)
    for block in range(4):  # each block of 6 positions holds the same ids as the unshuffled order's
        assert sorted(ids[6 * block : 6 * block + 6]) == sorted(unshuffled[6 * block : 6 * block + 6])
    shards = [order.shard_of(int(i))[0] for i in unshuffled]
    for shard in range(4):  # a shard's images land within 2 * block - 1 positions
        where = [p for p, i in enumerate(ids) if order.shard_of(int(i))[0] == shard]
        assert max(where) - min(where) <= 2 * 6 - 1 and shards.count(shard) == len(where)


def test_step_and_eval_positions_tile_without_overlap() -> None:
    assert [list(step_positions(2, 4, r, 3)) for r in range(3)] == [
        [24, 25, 26, 27],
        [28, 29, 30, 31],
        [32, 33, 34, 35],
    ]
    got = [p for r in range(5) for w in range(3) for p in eval_positions(23, r, 5, 2, w, 3)]
    assert sorted(got) == list(range(23))


def test_acceptance_64_ranks_x_10_workers(sets: dict[str, str]) -> None:
    """One epoch sees every unlabeled key once; each step's keys are equal at 8, 16 and 64 ranks."""
    steps = -(-UNLABELED // GLOBAL_BATCH)  # 16 steps: the epoch and the start of the next
    at_64 = _step_keys(sets["unlabeled"], 64, 10, steps)
    epoch = [key for step in at_64 for key in step][:UNLABELED]
    assert Counter(epoch) == Counter(f"unl{i:05d}" for i in range(UNLABELED))
    assert _step_keys(sets["unlabeled"], 8, 3, steps) == at_64
    assert _step_keys(sets["unlabeled"], 16, 1, steps) == at_64


def test_labeled_stream_cycles_with_the_same_steps_at_any_world_size(sets: dict[str, str]) -> None:
    steps = 5  # 320 positions: 3.2 labeled epochs
    at_64 = _step_keys(sets["labeled"], 64, 10, steps, labeled=True)
    flat = [key for step in at_64 for key in step]
    for epoch in range(3):
        assert sorted(flat[epoch * LABELED : (epoch + 1) * LABELED]) == [
            f"lab{i:05d}" for i in range(LABELED)
        ]
    assert _step_keys(sets["labeled"], 8, 2, steps, labeled=True) == at_64


def test_a_resume_at_any_step_world_size_and_worker_count_continues_the_steps(sets: dict[str, str]) -> None:
    whole = _step_keys(sets["unlabeled"], 4, 2, 20)
    assert _step_keys(sets["unlabeled"], 16, 3, 9, start=11) == whole[11:]
    assert _step_keys(sets["unlabeled"], 1, 1, 3, start=14) == whole[14:17]


def test_views_are_seeded_by_place_not_by_reader(sets: dict[str, str]) -> None:
    one = next(_stream(sets["unlabeled"], 0, 1, batch_size=64, shuffle_buffer=300).reader_samples(0, 1))
    other = next(_stream(sets["unlabeled"], 0, 8, batch_size=8, shuffle_buffer=300).reader_samples(0, 4))
    assert one[-1] == other[-1] and all((a == b).all() for a, b in zip(one[:2], other[:2], strict=True))


def test_val_with_fewer_shards_than_readers_is_evaluated_exactly_once(sets: dict[str, str]) -> None:
    keys = []
    for rank in range(64):
        stream = _stream(sets["val"], rank, 64, infinite=False, views=1, labeled=True, batch_size=4)
        for worker in range(10):
            keys += [sample[-1] for sample in stream.reader_samples(worker, 10)]
    assert len(_urls(sets["val"])) == 2 and Counter(keys) == Counter(f"val{i:05d}" for i in range(VAL))


def test_index_shards_command(sets: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    from mtdist.cli import main

    url = _urls(sets["val"])[1]
    offsets_path(url).unlink()
    assert main(["index-shards", sets["val"]]) == 0
    assert f"{offsets_path(url)}: 40 samples" in capsys.readouterr().out and offsets_path(url).is_file()
    assert main(["index-shards", sets["val"]]) == 0
    assert "already has a current byte-offset table" in capsys.readouterr().out


# ------------------------------------------------------------------------------- through the DataLoaders
def _loader_keys(sets: dict[str, str], rank: int, world_size: int, workers: int, steps: int, start: int = 0):
    from mtdist.data import build_train_loader

    batches = build_train_loader(
        _urls(sets["labeled"]), _urls(sets["unlabeled"]), labeled_per_gpu=8 // world_size,
        unlabeled_per_gpu=16 // world_size, rank=rank, world_size=world_size, seed=3, transform=EVAL,
        channels=1, num_workers=workers, shuffle_buffer=300, start_batch=start, order="global",
        sample_counts=shard_sample_counts(sets["labeled"]) | shard_sample_counts(sets["unlabeled"]),
    )  # fmt: skip
    keys = []
    for _ in range(steps):
        next(batches)
        keys.append(batches.keys)
    batches.close()
    return keys


def test_train_loader_steps_are_equal_on_another_allocation(sets: dict[str, str]) -> None:
    """Rank 0 of 1 with 2 workers against ranks 0 and 1 of 2 with 1 and 3 workers, resumed at step 3."""
    whole = _loader_keys(sets, 0, 1, 2, 6)
    halves = [_loader_keys(sets, rank, 2, workers, 3, start=3) for rank, workers in ((0, 1), (1, 3))]
    for step in range(3):  # labeled first, then unlabeled, per rank
        lab = halves[0][step][:4] + halves[1][step][:4]
        unl = halves[0][step][4:] + halves[1][step][4:]
        assert whole[3 + step] == lab + unl


def test_eval_loader_with_workers_reads_one_shard_set_exactly_once(sets: dict[str, str]) -> None:
    from mtdist.data import build_eval_loader

    keys = []
    for rank in range(3):
        batches = build_eval_loader(
            _urls(sets["val"]), batch_size=7, rank=rank, world_size=3, transform=EVAL, channels=1,
            num_workers=2, order="global",
        )  # fmt: skip
        keys += [key for _, _, batch_keys in batches for key in batch_keys]
    assert Counter(keys) == Counter(f"val{i:05d}" for i in range(VAL))


def _corrupt_every_tenth(folder: Path) -> str:
    """60 samples in 3 shards, s003, s013, ... undecodable; the index's spec."""
    from mtdist.data import write_shards
    from mtdist.data.shards import encode_png

    good = np.random.default_rng(0).integers(0, 256, size=(6, 6), dtype=np.uint8)
    samples = [
        {"__key__": f"s{i:03d}", "png": b"not a png" if i % 10 == 3 else encode_png(good), "cls": 0}
        for i in range(60)
    ]
    write_shards(samples, folder, "bad", samples_per_shard=25)
    return str(folder / "bad.index.json")


def test_a_corrupt_sample_is_replaced_by_its_places_substitute_on_any_allocation(tmp_path: Path) -> None:
    spec = _corrupt_every_tenth(tmp_path)
    at_1 = _step_keys(spec, 1, 1, 4, report_skipped=False)
    assert _step_keys(spec, 4, 3, 4) == at_1 and all(len(step) == GLOBAL_BATCH for step in at_1)
    assert not {key for step in at_1 for key in step} & {f"s{i:03d}" for i in range(3, 60, 10)}
    stream = _stream(spec, 0, 1, batch_size=64, report_skipped=True)
    dropped = sum(sample[-1] for _, sample in zip(range(60), stream.reader_samples(0, 1), strict=False))
    assert dropped >= 6  # every corrupt place of the epoch met at least once (a substitute may be bad too)


def test_the_order_benchmark_runs_small() -> None:
    """benchmarks/data.py --order: both reads of the worker half, side by side (tiny: 16 images, 1 round)."""
    from benchmarks.data import order_cost, order_report_lines

    res = order_cost(num_images=16, rounds=1, batch=4)
    assert set(res["images_per_cpu_s"]) == {"sequential", "global_order"} and res["ratio"] > 0
    assert "global / sequential" in order_report_lines(res)[-1]


def test_a_moved_resume_near_the_error_bound_restarts_each_readers_bound(tmp_path: Path) -> None:
    """Inherited dropped samples (checkpoint.moved_position: one total) near the bound, resumed with 2
    workers, or on 2 ranks with 1 worker: the record keeps the exact total, but no reader is judged by
    the inherited total against its own, smaller share of the raw samples (that would trip the bound
    at once: DataError stops the run)."""
    from mtdist.data import ErrorBound, build_train_loader

    spec = _corrupt_every_tenth(tmp_path)

    def run(start: int, steps: int, skipped: dict | None, bound: ErrorBound, world: int, workers: int) -> int:
        batches = build_train_loader(
            _urls(spec), [], labeled_per_gpu=8 // world, unlabeled_per_gpu=0, rank=0, world_size=world,
            seed=3, transform=EVAL, channels=1, num_workers=workers, shuffle_buffer=30, start_batch=start,
            order="global", sample_counts=shard_sample_counts(spec), skipped=skipped, error_bound=bound,
            moved=skipped is not None,
        )  # fmt: skip
        for _ in range(steps):
            next(batches)
        total = batches.report(start + steps).errors_total
        batches.close()
        return total

    start, steps, loose, bound = 10, 4, ErrorBound(1.0, 0), ErrorBound(0.15, 0)
    inherited = run(0, start, None, loose, 1, 1)  # saved on 1 rank
    assert inherited / (start * 8 + inherited) < bound.max_fraction  # the run as a whole is within it
    assert inherited / (start * 4 + inherited) > bound.max_fraction  # half the raw samples are not
    for world, workers in ((1, 2), (2, 1)):  # a worker's or a rank's half of the steps
        new = run(start, steps, {}, loose, world, workers) if world > 1 else None
        total = run(start, steps, {"labeled": [inherited]}, bound, world, workers)
        if new is None:  # one rank: the uninterrupted run's total
            assert total == run(0, start + steps, None, loose, 1, workers)
        else:
            assert total == inherited + new
