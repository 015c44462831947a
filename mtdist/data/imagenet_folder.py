"""The ILSVRC-2012 folder layout: which image files a tree holds, their classes, and its label files.

train/<wnid>/*.JPEG gives the classes: class index = position of the wnid in sorted order (the
standard). val/ is either in class folders (val/<wnid>/*.JPEG) or flat (val/*.JPEG) with its labels
from a `<filename> <wnid>` file or from the devkit's ground truth (ILSVRC ids, one per line in file
name order) plus the wnids in ILSVRC id order. Keys are file name stems (`n01440764_10026`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .split import fraction_per_class, split_per_class

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
GROUND_TRUTH_NAME = "ILSVRC2012_validation_ground_truth.txt"
# Where the devkit's ground truth is looked for under the tree root when not given.
GROUND_TRUTH_DEFAULTS = (GROUND_TRUTH_NAME, f"ILSVRC2012_devkit_t12/data/{GROUND_TRUTH_NAME}")
_SHOWN = 5  # names listed in an error about many files

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The image tree or a label file is not as expected (the message names the file)."""


@dataclass(frozen=True)
class SourceImage:
    """One image file: `path` relative to the tree root, `key` its file name stem, its class."""

    path: str
    key: str
    wnid: str
    cls: int


@dataclass(frozen=True)
class ImagenetTree:
    """The sorted class list and the train and val images, each list sorted by (wnid, file name)."""

    classes: list[str]
    train: list[SourceImage]
    val: list[SourceImage]


def scan_tree(
    root: Path,
    *,
    val_labels: Path | None = None,
    val_ground_truth: Path | None = None,
    synsets: Path | None = None,
) -> ImagenetTree:
    """Read the layout under `root`; no image is opened. A tree without val/ has an empty val list."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"ImageNet root {root} is not a folder; give the folder holding train/ (and val/)")
    by_class = _class_folders(root / "train", root)
    classes = sorted(by_class)
    train = _images_of(by_class, classes)
    _check_unique_keys(train)
    val_dir = root / "val"
    if not val_dir.is_dir():
        log.warning("%s has no val/ folder: no val shards", root)
        return ImagenetTree(classes, train, [])
    if any(p.is_dir() for p in val_dir.iterdir()):
        val_by_class = _class_folders(val_dir, root)
        _check_known(val_by_class, classes, f"class folders of {val_dir}")
        val = _images_of(val_by_class, classes)
    else:
        val = _flat_val(val_dir, classes, val_labels, val_ground_truth or _find_ground_truth(root), synsets)
    _check_unique_keys(val)
    return ImagenetTree(classes, train, val)


def read_name_wnid_file(path: Path) -> dict[str, str]:
    """`<filename> <wnid>` lines (the paper's label files) as {file name stem: wnid}.

    Blank lines and `#` comments are ignored; a name may carry its extension or not.
    """
    pairs: dict[str, str] = {}
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise SourceError(f"{path}:{number}: expected '<filename> <wnid>', got {line!r}")
        stem = _stem(fields[0])
        if stem in pairs:
            raise SourceError(f"{path}:{number}: {fields[0]} is listed twice")
        pairs[stem] = fields[1]
    if not pairs:
        raise SourceError(f"{path} lists no '<filename> <wnid>' lines")
    return pairs


def choose_labeled(
    train: list[SourceImage],
    *,
    labels_file: Path | None = None,
    per_class: int = 0,
    fraction: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Indices into `train` (sorted) of the images that keep their label.

    From a labels file (every name must be a train image of the wnid it names), or a seeded balanced
    split: exactly `per_class` of every class, or round(fraction * class size) of every class.
    """
    if sum([labels_file is not None, per_class > 0, fraction > 0]) != 1:
        raise SourceError("choose the labeled subset one way: a labels file, labels per class or a fraction")
    if labels_file is None:
        labels = np.array([image.cls for image in train], dtype=np.int64)
        split = split_per_class if per_class > 0 else fraction_per_class
        try:
            return split(labels, per_class if per_class > 0 else fraction, seed)[0]
        except ValueError as err:
            raise SourceError(f"labeled split of the train images: {err}") from err
    wanted = read_name_wnid_file(labels_file)
    position = {image.key: i for i, image in enumerate(train)}
    _check_names(wanted, position, labels_file, "train images")
    folder_of = {k: train[position[k]].wnid for k in wanted}
    wrong = [f"{k} ({w}, but it is in {folder_of[k]})" for k, w in wanted.items() if folder_of[k] != w]
    if wrong:
        raise SourceError(
            f"{labels_file}: {len(wrong)} names have another wnid than their folder: {wrong[:_SHOWN]}"
        )
    return np.sort(np.array([position[k] for k in wanted], dtype=np.int64))


def _class_folders(folder: Path, root: Path) -> dict[str, list[str]]:
    """{wnid: sorted image paths relative to root} of `folder/<wnid>/`; an empty class folder is an error."""
    if not folder.is_dir():
        raise SourceError(f"{folder} is not a folder: expected the ILSVRC-2012 layout {folder}/<wnid>/*.JPEG")
    by_class: dict[str, list[str]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        names = _image_names(class_dir)
        if not names:
            raise SourceError(
                f"class folder {class_dir} holds no images (*.JPEG): restore its images or remove the folder"
            )
        by_class[class_dir.name] = [(class_dir / name).relative_to(root).as_posix() for name in names]
    if not by_class:
        raise SourceError(f"{folder} has no class folders: expected {folder}/<wnid>/*.JPEG")
    return by_class


def _image_names(folder: Path) -> list[str]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    names = sorted(p.name for p in files if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(names) < len(files):
        other = sorted(p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES)
        log.warning(
            "%s: ignored %d files not named %s, e.g. %s", folder, len(other), IMAGE_SUFFIXES, other[0]
        )
    return names


def _images_of(by_class: dict[str, list[str]], classes: list[str]) -> list[SourceImage]:
    cls_of = {wnid: i for i, wnid in enumerate(classes)}
    return [_source_image(path, wnid, cls_of[wnid]) for wnid in sorted(by_class) for path in by_class[wnid]]


def _source_image(path: str, wnid: str, cls: int) -> SourceImage:
    key = _stem(path)
    if not key or "." in key:
        # webdataset cuts a member name at its first dot: "a.b.JPEG" would become key "a", field "b.jpeg".
        raise SourceError(
            f"image file name {path!r} has a '.' in its stem (or none): rename it, keys must not"
        )
    return SourceImage(path, key, wnid, cls)


def _flat_val(
    val_dir: Path,
    classes: list[str],
    val_labels: Path | None,
    ground_truth: Path | None,
    synsets: Path | None,
) -> list[SourceImage]:
    """val/*.JPEG labelled by a `<filename> <wnid>` file, else by the devkit's ground truth."""
    names = _image_names(val_dir)
    if not names:
        raise SourceError(f"{val_dir} holds neither class folders nor images (*.JPEG)")
    if val_labels is not None:
        wnid_of, source = read_name_wnid_file(val_labels), val_labels
        _check_names(wnid_of, {_stem(n) for n in names}, val_labels, f"images in {val_dir}")
        missing = [n for n in names if _stem(n) not in wnid_of]
        if missing:
            raise SourceError(
                f"{val_labels} has no label for {len(missing)} images of {val_dir}: {missing[:_SHOWN]}"
            )
    elif ground_truth is not None:
        wnid_of, source = _read_ground_truth(ground_truth, synsets, names), ground_truth
    else:
        raise SourceError(
            f"{val_dir} is flat (no class folders) and has no labels: pass --val-labels FILE ('<filename> "
            f"<wnid>' lines), or the devkit's {GROUND_TRUTH_NAME} (--val-ground-truth; looked for under the "
            f"root as {' and '.join(GROUND_TRUTH_DEFAULTS)}) with --synsets FILE"
        )
    _check_known(wnid_of.values(), classes, f"wnids in {source}")
    cls_of = {wnid: i for i, wnid in enumerate(classes)}
    images = [
        _source_image(f"{val_dir.name}/{n}", wnid_of[_stem(n)], cls_of[wnid_of[_stem(n)]]) for n in names
    ]
    return sorted(images, key=lambda image: (image.wnid, image.path))


def _find_ground_truth(root: Path) -> Path | None:
    """The devkit's ground truth at one of its usual places under the root."""
    return next((root / c for c in GROUND_TRUTH_DEFAULTS if (root / c).is_file()), None)


def _read_ground_truth(path: Path, synsets: Path | None, names: list[str]) -> dict[str, str]:
    """The devkit's ground truth: line i holds the 1-based ILSVRC id of the i-th val file in name order."""
    if synsets is None:
        raise SourceError(
            f"{path} holds ILSVRC class ids, which are not the sorted-wnid order: pass --synsets FILE "
            f"(the wnids in ILSVRC id order, one per line, as in the devkit's meta.mat), or use --val-labels"
        )
    wnids = [line.split()[0] for _, line in _lines(synsets)]
    ids = []
    for number, line in _lines(path):
        if not line.isdigit() or not 1 <= int(line) <= len(wnids):
            raise SourceError(
                f"{path}:{number}: expected an ILSVRC id in 1..{len(wnids)} ({synsets}), got {line!r}"
            )
        ids.append(int(line))
    if len(ids) != len(names):
        raise SourceError(f"{path} has {len(ids)} labels but the flat val folder has {len(names)} images")
    return {_stem(name): wnids[i - 1] for name, i in zip(names, ids, strict=True)}


def _check_known(wnids: Iterable[str], classes: list[str], what: str) -> None:
    unknown = sorted(set(wnids) - set(classes))
    if unknown:
        raise SourceError(f"{len(unknown)} {what} are not train classes (train/<wnid>): {unknown[:_SHOWN]}")


def _check_names(wanted: dict[str, str], present: Iterable[str], path: Path, what: str) -> None:
    unknown = sorted(set(wanted) - set(present))
    if unknown:
        raise SourceError(
            f"{path} names {len(unknown)} files that are not {what}, e.g. {unknown[:_SHOWN]}: "
            "is it the label file of this tree?"
        )


def _check_unique_keys(images: list[SourceImage]) -> None:
    seen: dict[str, str] = {}
    for image in images:
        if image.key in seen:
            raise SourceError(
                f"{seen[image.key]} and {image.path} have the same key {image.key!r}: rename one"
            )
        seen[image.key] = image.path


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SourceError(f"cannot read {path}: {err}") from err
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            yield number, line


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    suffix = "." + base.rsplit(".", 1)[-1] if "." in base else ""
    return base[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else base
