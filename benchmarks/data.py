"""Two-view input pipeline: mtdist's fast ImageNet path vs JPEG decoding alone and a naive Pillow
pipeline, images/s per core; and how far mtdist's fused views are from the reference transform.

All read the same JPEG tar shards (written here by mtdist's shard writer) with one thread, each pass in
a fresh process of its own (as a loader worker runs one pipeline; process-wide settings such as the
allocator's that mtdist's worker half makes stay out of the others' figures), interleaved round by
round so that drift of a shared machine hits all alike; each rate is the median over rounds, in CPU
seconds of that process after a warm-up pass over two shards, and each ratio the median of the rounds'
own ratios. An image is one sample with both views.

- decode_only: the floor: tar read (the same reader) + full-size JPEG decode (simplejpeg, RGB),
  nothing else.
- mtdist: a ShardStream with ImagenetTrainGeometry, as a training loader worker runs it: tar read,
  JPEG header, one decode at the smallest DCT scale that keeps both crops >= 224, per view one affine
  warp (rotation, crop, scale and flip composed; area pre-reduction where it shrinks >= 2x), packed
  with its jitter draws; batches collated with torch.stack. Its device half (color jitter +
  normalization of the uint8 batch, data/imagenet_fast.py) runs on the GPU in training; here it is
  timed separately, on the CPU.
- pillow: a naive webdataset-style two-view pipeline: full Pillow decode, then per view Pillow rotate
  (whole image, nearest), crop + resize (BILINEAR, 224), flip, color jitter in random order with
  ImageEnhance (brightness, contrast, saturation), to a float tensor, normalized; collated with
  torch.stack. Conservative: no hue (ImageEnhance has none) and no RGB->RGB copy after decoding
  (webdataset's "pil" decoder makes one). pillow_hue adds hue as torchvision does it on PIL
  images (an HSV round trip), for information.

In a real loader worker, too (time_in_worker): mtdist and Pillow each run as a one-worker DataLoader
from mtdist's fork server, the main process copying every batch out as training's cat does; the figure
is the worker process's CPU time (/proc) per image after its first two batches. That includes what a
worker pays beyond the pipeline: the collate into shared memory and handing the batch over. mtdist's
train loaders collate with a BatchPool (batch memory reused, data/pool.py), Pillow with torch's default
(new shared memory per batch).

Fidelity: for each image and the same drawn parameters, the fused uint8 views (the real path, DCT
scale included) against the reference (transforms.reference_train_view / reference_eval_view on the
full decode: torchvision's semantics), absolute difference in uint8 levels, mean and 99th percentile.

The images: natural-ish content (smooth gradients, 1/f-like noise over octaves, fine grain) at
ImageNet-like sizes, mostly 500x375 / 375x500 / 500x333, a tenth at 1024x768, JPEG quality 90.

    .venv/bin/python -m benchmarks.data [--images 300] [--rounds 3] [--batch 32]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader

from mtdist.data import ShardStream, write_shards
from mtdist.data.decode import dct_scale_eighths, decode_image, jpeg_size, simplejpeg
from mtdist.data.imagenet_fast import (
    ImagenetEvalGeometry,
    ImagenetTrainFast,
    ImagenetTrainGeometry,
    unpack_views,
)
from mtdist.data.pool import BatchPool
from mtdist.data.stream import read_samples
from mtdist.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    random_resized_crop_box,
    reference_eval_view,
    reference_train_view,
)

# (height, width) and how often: ImageNet's common sizes, and a share of larger photos.
SIZE_MIX = [
    ((375, 500), 0.45),
    ((500, 375), 0.15),
    ((333, 500), 0.20),
    ((500, 333), 0.10),
    ((768, 1024), 0.10),
]
OUTPUT_PX = 224
REPO = Path(__file__).resolve().parents[1]
# Issue 14's goals, per core and side by side: the worker half >= 70% of decoding alone, >= 3.5x Pillow.
SHARE_OF_DECODE_GOAL = 0.70
PILLOW_RATIO_GOAL = 3.5


# ---------------------------------------------------------------------------------------------- data
def natural_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3]: a colour gradient, noise at 8 octaves (coarse ones stronger), fine grain.

    About 0.5 bytes per pixel at JPEG quality 90, as ImageNet's (~110 KB for ~0.2 megapixels).
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width)
    img = rng.uniform(40, 200, 3) + ramp[..., None] * rng.uniform(-80, 80, 3)
    for octave in range(1, 9):
        coarse = rng.normal(0, 32, (2**octave, 2**octave, 3)) + 128
        up = Image.fromarray(coarse.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        img += (np.asarray(up, np.float32) - 128) * (1.6 / octave**0.5)
    img += rng.normal(0, 12, (height, width, 3))
    return img.clip(0, 255).astype(np.uint8)


def write_benchmark_shards(out_dir: Path, num_images: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    sizes, weights = zip(*SIZE_MIX, strict=True)
    samples = []
    for i in range(num_images):
        height, width = sizes[rng.choice(len(sizes), p=np.array(weights) / sum(weights))]
        buf = io.BytesIO()
        Image.fromarray(natural_image(height, width, rng)).save(buf, "JPEG", quality=90)
        samples.append({"__key__": f"img{i:05d}", "jpg": buf.getvalue(), "cls": i % 1000})
    return [str(p) for p in write_shards(samples, out_dir, "bench", samples_per_shard=50)]


# ---------------------------------------------------------------------------------------------- pipelines
def decode_only(urls: list[str]) -> int:
    """Tar read + full-size JPEG decode of every sample, nothing else (the floor of any pipeline)."""
    count = 0
    for sample in read_samples(urls):
        simplejpeg.decode_jpeg(sample["jpg"], colorspace="RGB")
        count += 1
    return count


def mtdist_stream(urls: list[str]) -> ShardStream:
    """One pass of a training stream of ImagenetTrainGeometry's packed two-view samples."""
    return ShardStream(
        urls, rank=0, world_size=1, seed=0, transform=ImagenetTrainGeometry(OUTPUT_PX), channels=3,
        views=2, labeled=True, infinite=False, shuffle_buffer=100,
    )  # fmt: skip


def mtdist_batches(urls: list[str], batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """What a loader worker yields: (packed view1 batch, packed view2 batch), collated."""
    yield from _collate(iter(mtdist_stream(urls)), batch)


class PillowSamples(torch.utils.data.IterableDataset):
    """The naive pipeline's samples, (view1, view2, label, key); `hue` adds torchvision's PIL hue jitter.
    Iterated in one process (pillow_batches) or as a DataLoader's dataset (worker_loader)."""

    def __init__(self, urls: list[str], hue: bool = False) -> None:
        self.urls, self.hue = urls, hue

    def __iter__(self) -> Iterator[tuple]:
        gen = torch.Generator()
        for i, sample in enumerate(read_samples(self.urls)):
            rng = random.Random(i)
            image = Image.open(io.BytesIO(sample["jpg"]))
            image = image if image.mode == "RGB" else image.convert("RGB")  # open + convert loads it
            gen.manual_seed(i)
            views = pillow_view(image, rng, gen, self.hue), pillow_view(image, rng, gen, self.hue)
            yield *views, int(sample["cls"]), sample["__key__"]


def pillow_batches(urls: list[str], batch: int, hue: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The naive pipeline's collated (view1, view2) batches."""
    yield from _collate(iter(PillowSamples(urls, hue)), batch)


def pillow_view(image: Image.Image, rng: random.Random, gen: torch.Generator, hue: bool) -> torch.Tensor:
    """The naive per-view augmentation: the paper's ops, each a Pillow call, then float normalization.

    ImageEnhance has no hue; with `hue` it is done as torchvision does on PIL images (HSV round trip).
    """
    view = image.rotate(rng.uniform(-10, 10), resample=Image.NEAREST)
    top, left, h, w = random_resized_crop_box(view.height, view.width, (0.08, 1.0), (3 / 4, 4 / 3), gen)
    view = view.crop((left, top, left + w, top + h)).resize((OUTPUT_PX, OUTPUT_PX), Image.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    ops = [0, 1, 2, 3] if hue else [0, 1, 2]
    rng.shuffle(ops)
    for op in ops:
        if op == 3:
            view = pillow_hue(view, rng.uniform(-0.1, 0.1))
        else:
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[op]
            view = enhancer(view).enhance(rng.uniform(0.6, 1.4))
    x = torch.from_numpy(np.array(view)).permute(2, 0, 1).float().div_(255.0)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def pillow_hue(image: Image.Image, shift: float) -> Image.Image:
    """Hue rotation by `shift` turns through Pillow's HSV mode (hue as 0..255)."""
    hue, sat, val = image.convert("HSV").split()
    offset = round(shift * 256)
    hue = hue.point([(i + offset) % 256 for i in range(256)])
    return Image.merge("HSV", (hue, sat, val)).convert("RGB")


def _collate(samples: Iterator[tuple], batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        chunk = [s for _, s in zip(range(batch), samples, strict=False)]
        if not chunk:
            return
        yield torch.stack([s[0] for s in chunk]), torch.stack([s[1] for s in chunk])


# Each timed in a fresh process of its own per round (time_in_child): a loader worker runs one of them,
# and process-wide state (the allocator settings mtdist's worker half makes, caches) must not leak
# from one pipeline into another's figure.
PIPELINES: dict[str, Callable[[list[str], int], Any]] = {
    "decode_only": lambda urls, batch: decode_only(urls),
    "mtdist": lambda urls, batch: list(mtdist_batches(urls, batch)),
    "pillow": lambda urls, batch: list(pillow_batches(urls, batch, hue=False)),
    "pillow_hue": lambda urls, batch: list(pillow_batches(urls, batch, hue=True)),
}


def time_in_child(name: str, urls: list[str], batch: int) -> tuple[float, float]:
    """(wall s, CPU s) of one pass of pipeline `name` over the shards, in a fresh Python process."""
    cmd = [sys.executable, "-m", "benchmarks.data", "--child", name, "--batch", str(batch), *urls]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return res["wall_s"], res["cpu_s"]


def child(name: str, urls: list[str], batch: int) -> None:
    """One warm-up pass over the first shard (lazy imports, first calls, the heap), then the timed
    pass over all; prints {"wall_s", "cpu_s"} as JSON."""
    torch.set_num_threads(1)
    PIPELINES[name](urls[:2], batch)
    wall_s, cpu_s, _ = _timed(lambda: PIPELINES[name](urls, batch))
    print(json.dumps({"wall_s": wall_s, "cpu_s": cpu_s}))


# ------------------------------------------------------------------------------ in a real loader worker
# mtdist_torch_collate: mtdist with torch's default collate, to show what the BatchPool itself saves
IN_WORKER = ("mtdist", "mtdist_torch_collate", "pillow")


def worker_loader(name: str, urls: list[str], batch: int) -> tuple[DataLoader, BatchPool | None]:
    """A one-worker DataLoader built as training builds it (loader._loader: mtdist's fork server, its
    worker_init_fn): mtdist's stream with its BatchPool collate (batch memory reused) or torch's default
    collate, or the naive pipeline with torch's default collate."""
    from mtdist.data.loader import _loader, worker_context

    pool = BatchPool(1, views=2, context=worker_context()) if name == "mtdist" else None
    dataset = mtdist_stream(urls) if name.startswith("mtdist") else PillowSamples(urls)
    return _loader(dataset, batch, num_workers=1, pin_memory=False, seed=0, collate=pool), pool


def worker_child(name: str, urls: list[str], batch: int) -> None:
    """One pass in a real loader worker: the main process copies each batch's views out (as training's
    cat does) and hands pooled slots back; prints the worker's CPU seconds for the images after the first
    two batches (its start and warm-up), from /proc, as JSON."""
    torch.set_num_threads(1)
    loader, pool = worker_loader(name, urls, batch)
    batches, start_cpu, images = iter(loader), 0.0, 0
    for n, (view1, view2, *_) in enumerate(batches):
        copies = torch.cat([view1]), torch.cat([view2])  # noqa: F841 - the copy out, as training makes
        if pool is not None:
            pool.release(n, (view1, view2))
        if n == 1:
            worker_pid = batches._workers[0].pid
            start_cpu = process_cpu_s(worker_pid)
        elif n > 1:
            images += len(view1)
    print(json.dumps({"images": images, "cpu_s": process_cpu_s(worker_pid) - start_cpu}))


def process_cpu_s(pid: int) -> float:
    """CPU seconds of a process, all its threads: /proc/PID/task/*/schedstat (ns), else /proc/PID/stat."""
    tasks = list(Path(f"/proc/{pid}/task").glob("*/schedstat"))
    if tasks:
        return sum(int(t.read_text().split()[0]) for t in tasks) / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_in_worker(name: str, urls: list[str], batch: int) -> float:
    """Worker CPU seconds per image of pipeline `name` in a real loader worker (worker_child)."""
    cmd = [sys.executable, "-m", "benchmarks.data", "--worker-child", name, "--batch", str(batch), *urls]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return res["cpu_s"] / res["images"]


# ---------------------------------------------------------------------------------------------- fidelity
def fidelity(urls: list[str], seed: int = 0) -> dict[str, float]:
    """Mean and 99th percentile of |fused - reference| in uint8 levels, train views (two per image, the
    same draws) and eval views, over every pixel of the shards' images."""
    geometry, evaluate = ImagenetTrainGeometry(OUTPUT_PX), ImagenetEvalGeometry(256, OUTPUT_PX)
    train, evals = [], []
    for i, sample in enumerate(read_samples(urls)):
        data, full = sample["jpg"], decode_image(sample["jpg"], 3)
        fused, _ = unpack_views(torch.stack(geometry.views_from_bytes(data, 2, _seeded(seed, i))), OUTPUT_PX)
        gen = _seeded(seed, i)
        params = [geometry.draw(full.shape[1], full.shape[2], gen) for _ in range(2)]
        for view, p in zip(fused, params, strict=True):
            train.append(_abs_diff(view, reference_train_view(full, p, OUTPUT_PX)))
        (view,) = evaluate.views_from_bytes(data, 1)
        evals.append(_abs_diff(view, reference_eval_view(full, 256, OUTPUT_PX)))
    out = {}
    for name, diffs in (("train", train), ("eval", evals)):
        d = np.concatenate(diffs)
        out[f"{name}_mean"], out[f"{name}_p99"] = float(d.mean()), float(np.percentile(d, 99))
    return out


def _seeded(seed: int, i: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def _abs_diff(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (a.numpy().astype(np.int16) - b.numpy().astype(np.int16)).ravel().__abs__().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- timing
def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, this process's CPU seconds, result). CPU time is what a core spends: on a
    shared machine it does not count the time other processes hold the core (wall time does)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def reduced_decode_share(urls: list[str], seed: int = 0) -> float:
    """Share of the images whose two views (drawn afresh, as in training) allow a reduced-size decode."""
    geometry, gen, reduced, total = ImagenetTrainGeometry(OUTPUT_PX), torch.Generator(), 0, 0
    for i, sample in enumerate(read_samples(urls)):
        hw = jpeg_size(sample["jpg"])
        gen.manual_seed(seed * 1_000_003 + i)
        if hw is not None:
            params = [geometry.draw(*hw, gen) for _ in range(2)]
            reduced += dct_scale_eighths((s for p in params for s in p.box[2:]), OUTPUT_PX) < 8
        total += 1
    return reduced / max(total, 1)


def run(num_images: int = 300, rounds: int = 5, batch: int = 32, seed: int = 0) -> dict[str, Any]:
    """Time the pipelines (and mtdist's device half, on the CPU) on the same shards; images/s per core."""
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mtdist-bench-data-") as tmp:
        write_s, _, urls = _timed(lambda: write_benchmark_shards(Path(tmp), num_images, seed))
        jpeg_bytes = [len(s["jpg"]) for s in read_samples(urls)]
        pixels = [int(np.prod(jpeg_size(s["jpg"]))) for s in read_samples(urls)]
        finish = ImagenetTrainFast(OUTPUT_PX)  # the device half; device None: where the batch is, the CPU
        packed = list(mtdist_batches(urls, batch))  # the device half's input
        wall: dict[str, list[float]] = {name: [] for name in (*PIPELINES, "device_half_cpu")}
        cpu: dict[str, list[float]] = {name: [] for name in wall}
        in_worker: dict[str, list[float]] = {name: [] for name in IN_WORKER}  # worker CPU s per image
        for _ in range(rounds):
            for name in PIPELINES:
                wall_s, cpu_s = time_in_child(name, urls, batch)
                wall[name].append(wall_s)
                cpu[name].append(cpu_s)
            wall_s, cpu_s, _ = _timed(lambda: [finish(v) for pair in packed for v in pair])
            wall["device_half_cpu"].append(wall_s)
            cpu["device_half_cpu"].append(cpu_s)
            for name in IN_WORKER:
                in_worker[name].append(time_in_worker(name, urls, batch))
        reduced = reduced_decode_share(urls, seed)
        fid = fidelity(urls, seed)
    rate = {name: num_images / statistics.median(t) for name, t in cpu.items()}
    wall_rate = {name: num_images / statistics.median(t) for name, t in wall.items()}
    both_on_cpu = 1 / (1 / rate["mtdist"] + 1 / rate["device_half_cpu"])
    return {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "images": num_images,
        "rounds": rounds,
        "batch": batch,
        "mean_jpeg_kb": float(np.mean(jpeg_bytes) / 1024),
        "mean_megapixels": float(np.mean(pixels) / 1e6),
        "reduced_decode_share": reduced,
        "shard_write_s": write_s,
        "images_per_cpu_s": rate,
        "images_per_wall_s": wall_rate,
        "ratio": per_round_ratio(cpu["pillow"], cpu["mtdist"]),
        "share_of_decode": per_round_ratio(cpu["decode_only"], cpu["mtdist"]),
        "share_of_decode_wall": wall_rate["mtdist"] / wall_rate["decode_only"],
        "fidelity": fid,
        "ratio_wall": wall_rate["mtdist"] / wall_rate["pillow"],
        "ratio_vs_pillow_hue": rate["mtdist"] / rate["pillow_hue"],
        "mtdist_both_halves_on_cpu_images_per_s": both_on_cpu,
        "ratio_both_halves_on_cpu": both_on_cpu / rate["pillow"],
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "in_worker_images_per_cpu_s": {name: 1 / statistics.median(t) for name, t in in_worker.items()},
        "ratio_in_worker": per_round_ratio(in_worker["pillow"], in_worker["mtdist"]),
        "ratios": goal_rows(
            per_round_ratio(cpu["decode_only"], cpu["mtdist"]),
            per_round_ratio(cpu["pillow"], cpu["mtdist"]),
            per_round_ratio(in_worker["pillow"], in_worker["mtdist"]),
        ),
    }


def per_round_ratio(slower_s: list[float], faster_s: list[float]) -> float:
    """Median over rounds of one round's time ratio: two passes timed side by side in a round share
    that moment's load, so a noisy round moves both (the rates' medians can come from other rounds)."""
    return statistics.median(a / b for a, b in zip(slower_s, faster_s, strict=True))


def goal_rows(share: float, ratio: float, ratio_in_worker: float) -> list[dict[str, Any]]:
    """The goal ratios in benchmarks/run.py's form (it prints them in the ratio table): the share of
    decode only and the Pillow ratio in one process, and the Pillow ratio in real loader workers."""
    return [
        {
            "name": "(b) worker half / decode only, images/s per core",
            "value": share,
            "goal": f">= {SHARE_OF_DECODE_GOAL}",
            "met": share >= SHARE_OF_DECODE_GOAL,
        },
        {
            "name": "(b) worker half / naive Pillow, images/s per core",
            "value": ratio,
            "goal": f">= {PILLOW_RATIO_GOAL}",
            "met": ratio >= PILLOW_RATIO_GOAL,
        },
        {
            "name": "(b) the same in a real loader worker (its collate included)",
            "value": ratio_in_worker,
            "goal": f">= {PILLOW_RATIO_GOAL}",
            "met": ratio_in_worker >= PILLOW_RATIO_GOAL,
        },
    ]


def report_lines(res: dict[str, Any]) -> list[str]:
    rate, wall, fid = res["images_per_cpu_s"], res["images_per_wall_s"], res["fidelity"]
    rows = [
        ("decode only: tar read + full-size JPEG decode", "decode_only"),
        ("mtdist worker half: tar, one DCT-scaled decode, 2 views of one warp each", "mtdist"),
        ("naive Pillow, ImageEnhance brightness/contrast/saturation", "pillow"),
        ("naive Pillow, plus torchvision-style HSV hue", "pillow_hue"),
        ("mtdist device half (jitter incl. hue + normalize), on the CPU", "device_half_cpu"),
    ]
    return [
        f"machine: {res['machine']}, {res['cpus']} CPUs, torch {res['torch']}, {res['threads']} thread; "
        f"load average {res['load_before']:.2f} before, {res['load_after']:.2f} after",
        f"{res['images']} JPEGs, mean {res['mean_jpeg_kb']:.0f} KB, {res['mean_megapixels']:.3f} MP; "
        f"{res['reduced_decode_share']:.0%} decodable below full size; median of {res['rounds']} rounds",
        "| pipeline (an image = both views) | images/s per core (CPU time) | images/s (wall) |",
        "|---|---|---|",
        *(f"| {label} | {rate[key]:.0f} | {wall[key]:.0f} |" for label, key in rows),
        f"| mtdist, both halves on one CPU core | {res['mtdist_both_halves_on_cpu_images_per_s']:.0f} | |",
        f"mtdist worker half / decode only: {res['share_of_decode']:.0%} per core "
        f"(wall: {res['share_of_decode_wall']:.0%}; goal >= {SHARE_OF_DECODE_GOAL:.0%})",
        f"ratio mtdist / Pillow: {res['ratio']:.2f}x per core (wall: {res['ratio_wall']:.2f}x; "
        f"goal >= {PILLOW_RATIO_GOAL}x); "
        f"vs Pillow with hue {res['ratio_vs_pillow_hue']:.2f}x; with the device half also on the CPU "
        f"{res['ratio_both_halves_on_cpu']:.2f}x",
        "in a real loader worker (one worker, its CPU time; mtdist's BatchPool collate, Pillow's default): "
        f"mtdist {res['in_worker_images_per_cpu_s']['mtdist']:.0f} (with torch's collate "
        f"{res['in_worker_images_per_cpu_s']['mtdist_torch_collate']:.0f}), Pillow "
        f"{res['in_worker_images_per_cpu_s']['pillow']:.0f} images/s per worker core: "
        f"{res['ratio_in_worker']:.2f}x",
        "fidelity, fused vs reference views, |difference| in uint8 levels: "
        f"train mean {fid['train_mean']:.2f}, p99 {fid['train_p99']:.0f}; "
        f"eval mean {fid['eval_mean']:.2f}, p99 {fid['eval_p99']:.0f}",
    ]


# ------------------------------------------------------------- global order vs sequential read (issue 13)
def order_cost(num_images: int = 300, rounds: int = 5, batch: int = 32, seed: int = 0) -> dict[str, Any]:
    """The worker half (ImagenetTrainGeometry views, collated) read two ways from the same shards, interleaved
    round by round, one thread: today's sequential read (ShardStream, shard order + block shuffle, reader
    order) and the global order (GlobalStream: one pread of each sample's byte range, data.order=global).
    images/s per CPU second, medians over rounds; the goal: the global order costs at most 5%."""
    import itertools

    from mtdist.data.ordered import GlobalStream

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mtdist-bench-order-") as tmp:
        urls = write_benchmark_shards(Path(tmp), num_images, seed)
        geometry = ImagenetTrainGeometry(OUTPUT_PX)
        kw = dict(rank=0, world_size=1, seed=seed, transform=geometry, channels=3, views=2, labeled=True)
        kw |= dict(shuffle_buffer=100)

        def sequential() -> int:
            return sum(len(v1) for v1, _ in _collate(iter(ShardStream(urls, infinite=False, **kw)), batch))

        def global_order() -> int:
            stream = GlobalStream(urls, infinite=True, batch_size=batch, **kw)
            samples = itertools.islice(stream.reader_samples(0, 1), num_images)
            return sum(len(v1) for v1, _ in _collate(samples, batch))

        pipelines = {"sequential": sequential, "global_order": global_order}
        for fn in pipelines.values():
            fn()  # warm-up: page cache, offset tables (made at the first GlobalStream: one read per shard)
        cpu: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(rounds):
            for name, fn in pipelines.items():
                cpu[name].append(_timed(fn)[1])
    rate = {name: num_images / statistics.median(t) for name, t in cpu.items()}
    return {"images": num_images, "rounds": rounds, "images_per_cpu_s": rate,
            "ratio": rate["global_order"] / rate["sequential"]}  # fmt: skip


def order_report_lines(res: dict[str, Any]) -> list[str]:
    rate = res["images_per_cpu_s"]
    ok = "met" if res["ratio"] >= 0.95 else "NOT met"
    return [
        f"worker half, {res['images']} images, median of {res['rounds']} rounds, images/s per CPU second:",
        f"  sequential read (reader order)  {rate['sequential']:8.1f}",
        f"  global order (one pread/sample) {rate['global_order']:8.1f}",
        f"  global / sequential = {res['ratio']:.3f} (goal >= 0.95: {ok})",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--order", action="store_true", help="only the global order vs the sequential read")
    p.add_argument("--child", choices=list(PIPELINES), help=argparse.SUPPRESS)  # time_in_child's
    p.add_argument("--worker-child", choices=IN_WORKER, help=argparse.SUPPRESS)  # time_in_worker's
    p.add_argument("urls", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.urls, args.batch)
    if args.worker_child:
        return worker_child(args.worker_child, args.urls, args.batch)
    if args.order:
        print("\n".join(order_report_lines(order_cost(args.images, max(args.rounds, 5), args.batch))))
        return
    print("\n".join(report_lines(run(args.images, args.rounds, args.batch))))


if __name__ == "__main__":
    main()
