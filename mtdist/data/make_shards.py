"""`mtdist make-shards`: an ImageNet tree (ILSVRC-2012 layout) to WebDataset tar shards with indexes.

A run is a fixed plan, then its execution, so its result does not depend on the number of workers:
1. plan: the sorted file list, the label split and a seeded shuffle decide every shard's samples
   (sized by samples and/or bytes planned from the file sizes) before any image is read;
2. write: each shard by one worker process, under `<name>.partial`, renamed when complete, then a
   sidecar `.make-shards/<name>.json` records its plan digest and sha256; a shard whose tar and
   sidecar match the plan is kept as it is, so a re-run does only what is left;
3. verify: every shard written is re-read with webdataset's tar reader (keys, labels, sha256);
4. index: `<set>.index.json` (write_shards' format plus the class list and the converted and
   skipped files), written atomically last, so an index never names an unfinished shard.

A sample is `{key}.jpg` (the file's own bytes; a file that is not a JPEG decodable to RGB or
grayscale as is, e.g. CMYK or a PNG named .JPEG, is converted to an RGB JPEG), `{key}.cls` (class
index, ascii) and `{key}.wnid`. Unlabeled shards keep cls and wnid too: the stream ignores them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import webdataset
from PIL import Image
from tqdm import tqdm

from .imagenet_folder import SourceError, SourceImage, choose_labeled, scan_tree
from .seek import load_offsets, write_offsets
from .shards import INDEX_SUFFIX, _write_json_atomic
from .transforms import decode_image

DEFAULT_SAMPLES_PER_SHARD = 500
PARTIAL_SUFFIX = ".partial"
SIDECAR_DIR = ".make-shards"
_PLAN_VERSION = 1  # bump when the bytes written for the same plan change, so old shards are rewritten

log = logging.getLogger(__name__)


class BadImageError(ValueError):
    """A file that no decoder reads as an image (the message says why)."""


@dataclass(frozen=True)
class MakeShardsOptions:
    """What `mtdist make-shards` does; see `add_arguments` for each option's meaning."""

    src: Path
    out: Path
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD  # 0: no limit (then max_shard_bytes)
    max_shard_bytes: int = 0  # 0: no limit
    labels_file: Path | None = None
    labels_per_class: int = 0
    label_fraction: float = 0.0
    split_seed: int = 0
    unlabeled_includes_labeled: bool = False
    val_labels: Path | None = None
    val_ground_truth: Path | None = None
    synsets: Path | None = None
    shuffle_seed: int = 0
    workers: int = 1
    skip_bad: bool = False
    jpeg_quality: int = 95  # of converted files only
    progress: bool = True


@dataclass(frozen=True)
class ShardJob:
    """One shard of the plan: its final path and its samples in order."""

    src: Path
    path: Path
    samples: tuple[SourceImage, ...]
    skip_bad: bool
    jpeg_quality: int

    def digest(self) -> str:
        """What the shard's bytes are a function of: a kept shard must have been written from this."""
        plan = [
            _PLAN_VERSION,
            self.jpeg_quality,
            self.skip_bad,
            [[s.path, s.key, s.cls, s.wnid] for s in self.samples],
        ]
        return hashlib.sha256(json.dumps(plan).encode()).hexdigest()

    @property
    def sidecar(self) -> Path:
        return self.path.parent / SIDECAR_DIR / f"{self.path.name}.json"


@dataclass
class ShardResult:
    """A shard on disk: what the index records of it, and whether this run wrote it."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str
    converted: list[dict] = field(default_factory=list)  # {"key", "file", "reason"}
    skipped: list[dict] = field(default_factory=list)
    written: bool = True


@dataclass(frozen=True)
class MakeShardsReport:
    """Index file per set, and the shards this run wrote and kept."""

    indexes: dict[str, Path]
    written: list[str]
    kept: list[str]


def make_shards(opts: MakeShardsOptions) -> MakeShardsReport:
    """Plan, write (or keep), verify and index the shards of every set; see the module docstring."""
    _check_options(opts)
    tree = scan_tree(
        opts.src, val_labels=opts.val_labels, val_ground_truth=opts.val_ground_truth, synsets=opts.synsets
    )
    out = Path(opts.out)
    (out / SIDECAR_DIR).mkdir(parents=True, exist_ok=True)
    jobs = {
        prefix: plan_shards(images, prefix, opts)
        for prefix, images in _sets(tree.train, tree.val, opts).items()
    }
    for prefix, set_jobs in jobs.items():
        # The old index goes first: the new one is written only once every shard is verified.
        (out / f"{prefix}{INDEX_SUFFIX}").unlink(missing_ok=True)
        _warn_stale(out, prefix, {job.path.name for job in set_jobs})
    all_jobs = [job for set_jobs in jobs.values() for job in set_jobs]
    results = _map(write_or_keep, all_jobs, opts, "write")
    written = [(job, results[job.path.name]) for job in all_jobs if results[job.path.name].written]
    _map(_verify_written, written, opts, "verify")
    indexes = {
        prefix: _write_index(out, prefix, tree.classes, [results[job.path.name] for job in set_jobs])
        for prefix, set_jobs in jobs.items()
    }
    kept = [name for name, result in results.items() if not result.written]
    return MakeShardsReport(indexes, [job.path.name for job, _ in written], sorted(kept))


def plan_shards(images: list[SourceImage], prefix: str, opts: MakeShardsOptions) -> list[ShardJob]:
    """The set's images in a seeded order (so no shard is one class), cut into shards.

    A shard closes at `samples_per_shard` samples or before its planned tar size would pass
    `max_shard_bytes` (file sizes plus tar headers; a converted file may differ a little), whichever
    comes first; a single sample larger than the limit gets a shard of its own.
    """
    rng = np.random.default_rng([opts.shuffle_seed, zlib.crc32(prefix.encode())])
    ordered = [images[i] for i in rng.permutation(len(images))]
    sizes = [_planned_bytes(opts.src / im.path) if opts.max_shard_bytes else 0 for im in ordered]
    groups: list[list[SourceImage]] = []
    group_bytes = 0
    for image, size in zip(ordered, sizes, strict=True):
        full = bool(groups) and 0 < opts.samples_per_shard <= len(groups[-1])
        too_big = bool(groups) and 0 < opts.max_shard_bytes < _tar_bytes(group_bytes + size)
        if not groups or full or too_big:
            groups.append([])
            group_bytes = 0
        groups[-1].append(image)
        group_bytes += size
    out = Path(opts.out)
    return [
        ShardJob(
            Path(opts.src), out / f"{prefix}-{i:06d}.tar", tuple(group), opts.skip_bad, opts.jpeg_quality
        )
        for i, group in enumerate(groups)
    ]


def prepare_image(path: Path, jpeg_quality: int) -> tuple[bytes, str | None]:
    """The bytes a sample stores, and why they were converted (None: the file's own bytes).

    A JPEG in RGB or grayscale is kept byte for byte (the reader turns grayscale into RGB). Anything
    else Pillow reads (a CMYK JPEG, a PNG named .JPEG) becomes an RGB JPEG made from what the
    reader's decode_image would give, so a converted sample looks as the original would have.
    """
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind, mode = img.format, img.mode
            if kind == "JPEG" and mode in ("RGB", "L"):
                img.draft(mode, (1, 1))  # a 1/8-scale decode still reads every entropy-coded block
                img.load()
                return data, None
        rgb = decode_image(data, 3).permute(1, 2, 0).numpy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{type(err).__name__}: {err}") from None
    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): a conversion should not lose colour detail the file had
    Image.fromarray(rgb).save(buf, "JPEG", quality=jpeg_quality, subsampling=0)
    reason = f"{mode} JPEG" if kind == "JPEG" else f"{kind} ({mode}) file named {path.suffix}"
    return buf.getvalue(), reason


def write_or_keep(job: ShardJob) -> ShardResult:
    """The shard as its sidecar records it if the tar on disk is that one and matches the plan, else
    written anew."""
    kept = _kept(job)
    if kept is None:
        return write_shard(job)
    load_offsets(str(job.path))  # a shard kept from an older run gets its byte-offset table once
    return kept


def write_shard(job: ShardJob) -> ShardResult:
    """Write the job's tar under a temporary name, rename it, then record it in its sidecar."""
    tmp = job.path.with_name(job.path.name + PARTIAL_SUFFIX)
    converted, skipped = [], []
    with open(tmp, "wb") as f:
        sink = _HashingFile(f)
        # mtime 0: the tar's bytes are a function of the samples alone (see shards._write_tar)
        with webdataset.TarWriter(sink, encoder=False, mtime=0) as tar:
            for image in job.samples:
                try:
                    data, reason = prepare_image(job.src / image.path, job.jpeg_quality)
                except BadImageError as err:
                    if not job.skip_bad:
                        raise SourceError(
                            f"{job.src / image.path} is not a readable image ({err}): replace or remove "
                            "it, or pass --skip-bad to leave it out (it is then listed in the index)"
                        ) from None
                    skipped.append({"key": image.key, "file": image.path, "reason": str(err)})
                    continue
                if reason is not None:
                    converted.append({"key": image.key, "file": image.path, "reason": reason})
                tar.write(
                    {"__key__": image.key, "jpg": data, "cls": b"%d" % image.cls, "wnid": image.wnid.encode()}
                )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, job.path)
    write_offsets(str(job.path))  # each sample's byte range: a reader can start inside the shard
    result = ShardResult(
        job.path.name, len(job.samples) - len(skipped), sink.num_bytes, sink.hexdigest(), converted, skipped
    )
    _write_json_atomic(job.sidecar, {"plan": job.digest(), **asdict(result)})
    return result


def verify_shard(path: Path, expected: list[tuple[str, int, str]], sha256: str) -> str | None:
    """What is wrong with the tar at `path` (None: nothing), read with webdataset's tar reader:
    its samples' (key, cls, wnid) in order, a jpg in each, and the sha256 of the file."""
    try:
        with open(path, "rb") as f:
            source = _HashingFile(f)
            files = webdataset.tariterators.tar_file_expander([{"url": str(path), "stream": source}])
            samples = list(webdataset.tariterators.group_by_keys(files))
            while source.read(1 << 20):  # the end-of-archive padding the tar reader stops before
                pass
    except Exception as err:  # noqa: BLE001 - any failure to read it means: not this shard
        return f"cannot be read as a tar ({type(err).__name__}: {err})"
    found = [(s["__key__"], int(s.get("cls", b"-1")), s.get("wnid", b"").decode()) for s in samples]
    if found != expected:
        first = next((i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b), None)
        where = (
            f"first difference at sample {first}: {found[first]} vs {expected[first]}"
            if first is not None
            else ""
        )
        return f"holds {len(found)} samples, expected {len(expected)}; {where}".rstrip("; ")
    if missing := [s["__key__"] for s in samples if "jpg" not in s]:
        return f"samples without a jpg: {missing[:5]}"
    if source.hexdigest() != sha256:
        return f"sha256 {source.hexdigest()} differs from the recorded {sha256}"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `mtdist make-shards`."""
    p.add_argument("--src", type=Path, required=True, help="ILSVRC-2012 root: train/<wnid>/*.JPEG and val/")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and their *.index.json")
    size = p.add_argument_group("shard size (a shard closes at whichever limit comes first)")
    size.add_argument(
        "--samples-per-shard",
        type=int,
        help=f"default {DEFAULT_SAMPLES_PER_SHARD}, or no limit when --max-shard-bytes is given",
    )
    size.add_argument(
        "--max-shard-bytes", type=_byte_count, default=0, help="e.g. 1e9 or 512M (default: no limit)"
    )
    split = p.add_argument_group(
        "label split (one of; without any, all train images go to one 'train' set)",
        "The labeled images are written as train-labeled-*, the others as train-unlabeled-*.",
    )
    split.add_argument(
        "--labels-file", type=Path, help="'<filename> <wnid>' lines, e.g. the paper's 128 per class"
    )
    split.add_argument("--labels-per-class", type=int, default=0, help="a seeded balanced split: N per class")
    split.add_argument(
        "--label-fraction", type=float, default=0.0, help="a seeded split: round(F * n) per class"
    )
    split.add_argument(
        "--split-seed", type=int, default=0, help="seed of --labels-per-class / --label-fraction"
    )
    split.add_argument(
        "--unlabeled-includes-labeled", action="store_true", help="unlabeled = every train image"
    )
    val = p.add_argument_group("flat val/ (no class folders)")
    val.add_argument("--val-labels", type=Path, help="'<filename> <wnid>' lines for the val images")
    val.add_argument(
        "--val-ground-truth",
        type=Path,
        help="the devkit's ILSVRC2012_validation_ground_truth.txt (looked for under --src; needs --synsets)",
    )
    val.add_argument("--synsets", type=Path, help="wnids in ILSVRC id order (1..1000), one per line")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the sample order within each set")
    p.add_argument("--workers", type=int, default=_cores(), help="processes (default: all cores)")
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable files out (listed in the index)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="of files converted to RGB JPEG (default 95)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """`mtdist make-shards ...`: exit 0, or 2 with one line naming the bad input."""
    samples = args.samples_per_shard
    if samples is None:
        samples = 0 if args.max_shard_bytes else DEFAULT_SAMPLES_PER_SHARD
    names = [f.name for f in fields(MakeShardsOptions) if f.name != "samples_per_shard"]
    opts = MakeShardsOptions(samples_per_shard=samples, **{name: getattr(args, name) for name in names})
    try:
        report = make_shards(opts)
    except SourceError as err:
        print(f"mtdist make-shards: error: {err}", file=sys.stderr)
        return 2
    for prefix, path in report.indexes.items():
        index = json.loads(path.read_text())
        shards, converted, skipped = len(index["shards"]), len(index["converted"]), len(index["skipped"])
        print(
            f"{prefix}: {index['num_samples']} samples in {shards} shards, {converted} converted, "
            f"{skipped} skipped -> {path}"
        )
    print(f"shards written {len(report.written)}, kept from an earlier run {len(report.kept)}")
    return 0


# ------------------------------------------------------------------------------------------------ plan
def _check_options(opts: MakeShardsOptions) -> None:
    if (
        opts.samples_per_shard < 0
        or opts.max_shard_bytes < 0
        or not (opts.samples_per_shard or opts.max_shard_bytes)
    ):
        raise SourceError("give a shard size: samples_per_shard >= 1 and/or max_shard_bytes >= 1")
    if opts.workers < 1 or not 1 <= opts.jpeg_quality <= 100 or not 0.0 <= opts.label_fraction <= 1.0:
        raise SourceError(
            f"need workers >= 1, jpeg_quality in 1..100 and label_fraction in [0, 1]; got "
            f"{opts.workers}, {opts.jpeg_quality} and {opts.label_fraction}"
        )


def _sets(
    train: list[SourceImage], val: list[SourceImage], opts: MakeShardsOptions
) -> dict[str, list[SourceImage]]:
    """{set prefix: images}: `train`, or `train-labeled` and `train-unlabeled`; then `val` if any."""
    split = opts.labels_file is not None or opts.labels_per_class > 0 or opts.label_fraction > 0
    if not split and opts.unlabeled_includes_labeled:
        raise SourceError(
            "--unlabeled-includes-labeled needs a label split (--labels-file / -per-class / -fraction)"
        )
    sets: dict[str, list[SourceImage]] = {"train": train}
    if split:
        chosen = choose_labeled(
            train,
            labels_file=opts.labels_file,
            per_class=opts.labels_per_class,
            fraction=opts.label_fraction,
            seed=opts.split_seed,
        )
        labeled = set(chosen.tolist())
        rest = (
            train
            if opts.unlabeled_includes_labeled
            else [im for i, im in enumerate(train) if i not in labeled]
        )
        sets = {"train-labeled": [train[i] for i in chosen], "train-unlabeled": rest}
    if val:
        sets["val"] = val
    for prefix in [p for p, images in sets.items() if not images]:
        log.warning("set %s has no images: not written", prefix)
        del sets[prefix]
    return sets


def _planned_bytes(path: Path) -> int:
    """A sample's bytes in the tar: three members (jpg, cls, wnid), each a header plus whole blocks."""
    return 3 * tarfile.BLOCKSIZE + _round_up(path.stat().st_size, tarfile.BLOCKSIZE) + 2 * tarfile.BLOCKSIZE


def _tar_bytes(member_bytes: int) -> int:
    """A streamed tar's size: its members, two zero blocks, then padding to whole records."""
    return _round_up(member_bytes + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _warn_stale(out: Path, prefix: str, planned: set[str]) -> None:
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    stale = sorted(p.name for p in out.iterdir() if pattern.fullmatch(p.name) and p.name not in planned)
    if stale:
        log.warning(
            "%s holds %d %s shards not in this plan (e.g. %s): the index leaves them out, a glob would not",
            out,
            len(stale),
            prefix,
            stale[0],
        )


# ------------------------------------------------------------------------------------- write and verify
def _kept(job: ShardJob) -> ShardResult | None:
    """The shard's recorded result when its tar and sidecar exist, match the plan, and verify."""
    if not job.path.is_file() or not job.sidecar.is_file():
        return None
    try:
        record = json.loads(job.sidecar.read_text())
        result = ShardResult(**{k: v for k, v in record.items() if k != "plan"})
    except (OSError, ValueError, TypeError):
        return None
    if record.get("plan") != job.digest():
        return None
    problem = verify_shard(job.path, _expected(job, result), result.sha256)
    if problem is not None:
        log.info("rewriting %s: it %s", job.path, problem)
        return None
    result.written = False
    return result


def _verify_written(item: tuple[ShardJob, ShardResult]) -> int:
    job, result = item
    problem = verify_shard(job.path, _expected(job, result), result.sha256)
    if problem is not None:
        raise SourceError(
            f"shard {job.path} failed its check after writing: it {problem}; run make-shards again"
        )
    return result.num_samples


def _expected(job: ShardJob, result: ShardResult) -> list[tuple[str, int, str]]:
    skipped = {s["key"] for s in result.skipped}
    return [(s.key, s.cls, s.wnid) for s in job.samples if s.key not in skipped]


def _write_index(out: Path, prefix: str, classes: list[str], results: list[ShardResult]) -> Path:
    index = {
        "shards": [
            {"name": r.name, "num_samples": r.num_samples, "sha256": r.sha256, "num_bytes": r.num_bytes}
            for r in results
        ],
        "num_samples": sum(r.num_samples for r in results),
        "num_classes": len(classes),
        "classes": classes,
        "converted": [c for r in results for c in r.converted],
        "skipped": [s for r in results for s in r.skipped],
    }
    path = out / f"{prefix}{INDEX_SUFFIX}"
    _write_json_atomic(path, index)
    return path


def _map(fn: Callable, items: list, opts: MakeShardsOptions, what: str) -> dict:
    """{shard name: fn(item)} over worker processes, with a progress bar counting samples."""
    workers = min(opts.workers, len(items))
    # The pool is started before the bar, whose monitor thread a forked worker must not inherit.
    total = sum(len(_job_of(item).samples) for item in items)
    with (
        multiprocessing.Pool(workers, _one_thread) if workers > 1 else contextlib.nullcontext() as pool,
        tqdm(
            total=total, unit="img", desc=f"make-shards {what}", disable=not opts.progress or not items
        ) as bar,
    ):
        outputs = pool.imap(fn, items) if pool is not None else map(fn, items)
        results = {}
        for item, output in zip(items, outputs, strict=True):
            results[_job_of(item).path.name] = output
            bar.update(len(_job_of(item).samples))
    return results


def _one_thread() -> None:
    """A forked worker must not enter OpenMP (libgomp's pool does not survive a fork: the first
    parallel torch op of the child hangs); one thread per worker process is what it needs anyway."""
    torch.set_num_threads(1)


def _job_of(item: ShardJob | tuple[ShardJob, ShardResult]) -> ShardJob:
    return item[0] if isinstance(item, tuple) else item


class _HashingFile:
    """A file wrapper that hashes and counts the bytes written to it or read from it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.num_bytes, self._sha = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        self.num_bytes += len(data)
        return self.f.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self._sha.update(data)
        self.num_bytes += len(data)
        return data

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _byte_count(text: str) -> int:
    """`1e9`, `512M`, `1G` (powers of 1024 for K/M/G) as a number of bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count such as 1e9 or 512M, got {text!r}") from None
