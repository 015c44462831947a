"""A fake ImageNet tree in the ILSVRC-2012 layout, of real JPEGs written with Pillow.

Images are 40..160 px on a side; each class has its own color and stripe orientation (so a model can
learn them) and every image its own noise. Like the real data set, train holds one grayscale JPEG,
one CMYK JPEG and one PNG file named .JPEG; val holds one CMYK JPEG. Val is in class folders, or flat
with the devkit's ground truth file (ILSVRC ids in an id order that is not the sorted wnid order).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

GROUND_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
MIN_SIDE_PX, MAX_SIDE_PX = 40, 160


def make_imagenet_tree(
    root: Path,
    classes: int = 10,
    per_class: int = 50,
    val_per_class: int = 5,
    seed: int = 0,
    *,
    val_layout: str = "folders",
) -> dict:
    """Write `root/train/<wnid>/<wnid>_<n>.JPEG` and val (`val_layout` "folders" or "flat").

    Returns {"root", "wnids" (sorted), "train" / "val" ({key: wnid}), "files" ({key: path} of both),
    "grayscale" / "cmyk" / "png" (keys of the special files), "val_labels" ('<filename> <wnid>'
    lines for val), "synsets" (wnids in the fake ILSVRC id order) and "ground_truth" (flat only, else
    None)}. Keys are file name stems.
    """
    if val_layout not in ("folders", "flat"):
        raise ValueError(f"val_layout must be 'folders' or 'flat', got {val_layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    wnids = sorted(f"n{n:08d}" for n in rng.choice(14_000_000, classes, replace=False) + 1_000_000)
    styles = [_class_style(rng) for _ in wnids]
    tree: dict = {"root": root, "wnids": wnids, "train": {}, "val": {}, "files": {}}
    # (class, image number in the class) of the special files
    special = {(0, 0): "grayscale", (1 % classes, 1): "cmyk", (2 % classes, 2): "png"}
    tree |= {kind: [] for kind in special.values()}
    for c, wnid in enumerate(wnids):
        numbers = sorted(rng.choice(20_000, per_class, replace=False) + 1)
        for i, number in enumerate(numbers):
            key, kind = f"{wnid}_{number}", special.get((c, i), "rgb")
            path = root / "train" / wnid / f"{key}.JPEG"
            _write(path, _image(styles[c], rng), kind)
            tree["train"][key], tree["files"][key] = wnid, path
            if kind != "rgb":
                tree[kind].append(key)
    val_classes = rng.permutation(np.repeat(np.arange(classes), val_per_class))
    for n, c in enumerate(val_classes.tolist(), start=1):
        key, wnid = f"ILSVRC2012_val_{n:08d}", wnids[c]
        path = root / "val" / (wnid if val_layout == "folders" else "") / f"{key}.JPEG"
        _write(path, _image(styles[c], rng), "cmyk" if n == 1 else "rgb")
        tree["val"][key], tree["files"][key] = wnid, path
    tree["val_labels"] = root / "val_labels.txt"
    tree["val_labels"].write_text("".join(f"{k}.JPEG {w}\n" for k, w in tree["val"].items()))
    # The devkit numbers classes in its own order (ILSVRC2012_ID), not by sorted wnid: mimic that.
    ilsvrc_order = [wnids[i] for i in np.roll(np.arange(classes), 1)]
    tree["synsets"] = root / "synsets.txt"
    tree["synsets"].write_text("".join(f"{w} fake synset {i}\n" for i, w in enumerate(ilsvrc_order, 1)))
    tree["ground_truth"] = None
    if val_layout == "flat":
        tree["ground_truth"] = root / GROUND_TRUTH
        tree["ground_truth"].parent.mkdir(parents=True, exist_ok=True)
        ids = [ilsvrc_order.index(tree["val"][k]) + 1 for k in sorted(tree["val"])]
        tree["ground_truth"].write_text("".join(f"{i}\n" for i in ids))
    return tree


def _class_style(rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """A class's base color, stripe frequency (radians per px) and stripe angle."""
    return rng.uniform(40, 215, 3), rng.uniform(0.1, 0.6), rng.uniform(0, np.pi)


def _image(style: tuple[np.ndarray, float, float], rng: np.random.Generator) -> np.ndarray:
    color, freq, angle = style
    h, w = rng.integers(MIN_SIDE_PX, MAX_SIDE_PX + 1, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * freq + rng.uniform(0, 2 * np.pi))
    image = color * (0.7 + 0.3 * stripes[..., None]) + rng.normal(0, 10, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(path: Path, image: np.ndarray, kind: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(image)
    buf = io.BytesIO()
    if kind == "grayscale":
        pil.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "cmyk":
        pil.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "png":
        pil.save(buf, "PNG")  # a PNG under a .JPEG name, as n02105855_2933.JPEG in the real train set
    else:
        pil.save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue())
