"""WebDataset tar shards: writing them with an index, and resolving a shard spec to a list of files."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset
from braceexpand import braceexpand
from PIL import Image

from .seek import write_offsets

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
INDEX_SUFFIX = ".index.json"


def write_shards(samples: Iterable[dict], out_dir: Path, prefix: str, samples_per_shard: int) -> list[Path]:
    """Write `{prefix}-{i:06d}.tar` shards of `{"__key__", "png" | "jpg", "cls"}` samples plus an index.

    The index `{prefix}.index.json` lists every shard with its sample count and sha256, and
    `num_classes` = largest cls + 1. It is written last and atomically, so a reader never sees an
    index naming a shard that is not complete.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries, paths, max_cls = [], [], []
    for i, chunk in enumerate(_chunks(_checked(samples), samples_per_shard)):
        paths.append(_write_tar(out_dir / f"{prefix}-{i:06d}.tar", chunk))
        entries.append({"name": paths[-1].name, "num_samples": len(chunk), "sha256": file_sha256(paths[-1])})
        max_cls.append(max(int(s["cls"]) for s in chunk))
    if not paths:
        raise ValueError(f"no samples to write for {out_dir / prefix}")
    total = sum(e["num_samples"] for e in entries)
    index = {"shards": entries, "num_samples": total, "num_classes": max(max_cls) + 1}
    _write_json_atomic(out_dir / f"{prefix}{INDEX_SUFFIX}", index)
    return paths


def write_array_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    keys: list[str],
    out_dir: Path,
    prefix: str,
    samples_per_shard: int,
    *,
    shuffle_seed: int | None = 0,
) -> list[Path]:
    """Write uint8 images ([N, H, W] or [N, H, W, C]) as PNG samples with their labels.

    Samples are written in an order permuted with `shuffle_seed` (None keeps the given order):
    packaged sets are often sorted by class (MNIST-5k is), and a stream that shuffles shard order
    and mixes within a buffer cannot undo one class per shard.
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} {images.shape}")
    if not len(images) == len(labels) == len(keys):
        raise ValueError(f"{len(images)} images, {len(labels)} labels and {len(keys)} keys: lengths differ")
    order = (
        np.arange(len(images))
        if shuffle_seed is None
        else np.random.default_rng(shuffle_seed).permutation(len(images))
    )
    samples = ({"__key__": keys[i], "png": encode_png(images[i]), "cls": int(labels[i])} for i in order)
    return write_shards(samples, out_dir, prefix, samples_per_shard)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # A single-channel HWC array must be squeezed: Pillow reads [H, W] as grayscale, not [H, W, 1].
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image).save(buf, "png")
    return buf.getvalue()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def make_shards_hint(path: str | os.PathLike, rerun: bool = False) -> str:
    """The command that writes the shards a missing `path` belongs to (ImageNet folders -> shards)."""
    out = Path(path).parent
    if rerun:
        return f"`mtdist make-shards --src IMAGENET_DIR --out {out} ...` again rewrites missing shards"
    return (
        f"write the shards first: `mtdist make-shards --src IMAGENET_DIR --out {out}` (with --labels-file "
        "FILE or --labels-per-class N for train-labeled / train-unlabeled; README: ImageNet shards)"
    )


def read_index(path: str | os.PathLike) -> dict:
    """Load and validate a `*.index.json` written by write_shards."""
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard index {path} does not exist; {make_shards_hint(path)}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"shard index {path} cannot be read as JSON: {exc}") from exc
    _validate_index(index, path)
    return index


def resolve_shards(spec: str) -> list[str]:
    """Turn a shard spec into a list of shard paths (or urls).

    A spec is an `*.index.json` (shard names relative to it), a brace pattern
    (`data/train-{000000..000009}.tar`), a glob, or a comma-separated list of these.
    `pipe:` and `scheme://` urls pass through unchanged (they are opened by webdataset).
    """
    urls = [url for part in _split_top_level(spec, ",") for url in _resolve_part(part.strip(), spec)]
    if not urls:
        raise ValueError(f"shard spec {spec!r} names no shards")
    return urls


def shard_sample_counts(spec: str) -> dict[str, int]:
    """Samples per shard (keyed as resolve_shards names them) for the spec's `*.index.json` parts.

    Shards named otherwise (brace patterns, globs, urls) have no entry: a stream counts them by
    reading when it needs to (a resume), so give an index to make resuming cheap.
    """
    counts: dict[str, int] = {}
    for part in (p.strip() for p in _split_top_level(spec, ",")):
        if part.endswith(INDEX_SUFFIX) and not _is_remote(part):
            base = Path(part).parent
            entries = read_index(part)["shards"]
            counts |= {str(base / e["name"]): int(e["num_samples"]) for e in entries if "num_samples" in e}
    return counts


def _resolve_part(part: str, spec: str) -> list[str]:
    if _is_remote(part):
        return [part]
    if part.endswith(INDEX_SUFFIX):
        base = Path(part).parent
        paths = [str(base / entry["name"]) for entry in read_index(part)["shards"]]
    elif "{" in part:
        paths = list(braceexpand(part))
    elif glob.has_magic(part):
        paths = sorted(glob.glob(part))
    else:
        paths = [part] if part else []
    for path in paths:
        if not os.path.isfile(path):
            hint = make_shards_hint(path, rerun=True)
            raise FileNotFoundError(f"shard {path} does not exist (from shard spec {spec!r}); {hint}")
    return paths


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def _split_top_level(text: str, sep: str) -> list[str]:
    # Commas inside braces belong to a brace pattern ({a,b}), not to the list.
    parts, depth, current = [], 0, []
    for char in text:
        depth += (char == "{") - (char == "}")
        if char == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    return [p for p in [*parts, "".join(current)] if p.strip()]


def _checked(samples: Iterable[dict]) -> Iterator[dict]:
    seen: set[str] = set()
    for sample in samples:
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key.rsplit("/", 1)[-1]:
            # webdataset splits a member name at the first dot of its basename: "a.b.png" -> key "a".
            raise ValueError(f"sample key {key!r} must be a non-empty string without '.' in its last part")
        if key in seen:
            raise ValueError(f"duplicate sample key {key!r}")
        seen.add(key)
        _check_fields(sample, key)
        yield sample


def _check_fields(sample: dict, key: str) -> None:
    images = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
    if len(images) != 1 or not isinstance(sample[images[0]], bytes | bytearray | memoryview):
        raise ValueError(
            f"sample {key!r} needs exactly one of {IMAGE_EXTENSIONS} as bytes, has {list(sample)}"
        )
    if not isinstance(sample.get("cls"), int | np.integer) or sample["cls"] < 0:
        raise ValueError(f"sample {key!r} needs an integer 'cls' >= 0, got {sample.get('cls')!r}")


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _write_tar(path: Path, samples: list[dict]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    # A fixed mtime makes the tar bytes (and so the sha256) a function of the samples alone. It must
    # be an int: tarfile adds a PAX header to every member whose mtime is a float (the default,
    # time.time()), doubling the members the reader has to parse.
    with open(tmp, "wb") as f, webdataset.TarWriter(f, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(_encoded(sample))
    os.replace(tmp, path)
    write_offsets(str(path))  # the byte range of each sample, for readers that start inside the shard
    return path


def _encoded(sample: dict) -> dict:
    fields = {k: bytes(v) for k, v in sample.items() if k in IMAGE_EXTENSIONS}
    return {"__key__": sample["__key__"], **fields, "cls": str(int(sample["cls"])).encode("ascii")}


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _validate_index(index: object, path: str | os.PathLike) -> None:
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise ValueError(f"shard index {path} has no 'shards' list of {{'name': ...}} entries")
    if not isinstance(index.get("num_samples"), int):
        raise ValueError(f"shard index {path} has no integer 'num_samples'")
