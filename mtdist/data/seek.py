"""Stage 2 of the global order (order.py -> seek -> decode -> views): one sample read from inside a tar.

A shard `x.tar` has a byte-offset table `x.tar.idx.npy` beside it: row 0 is (the tar's size in bytes,
1 if the tar broke off while it was scanned else 0), row 1 + i is (offset, size) of sample i, the byte
range from its first member's header (or the extended header before it) to the end of its last
member's data. write_shards and make-shards write the table with the shard; `mtdist index-shards`
or the first stream to need it (`load_offsets`) makes it for an older shard with one read of the tar.
A reader then gets any sample with one pread of its range and parses the few tar headers in it.

Samples are grouped as webdataset's tar reader groups them (key = the name up to the first dot of its
basename, consecutive members), so the table and a sequential read see the same samples; a sample cut
by a broken tar is not in the table, as the sequential reader does not yield it either.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

OFFSETS_SUFFIX = ".idx.npy"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_BLOCK = tarfile.BLOCKSIZE
# Plain-file member types; anything else (PAX, GNU long names) is parsed by tarfile instead.
_PLAIN = (b"0", b"\0")
_OPEN_FILES = 64  # per reader process: bounded, a set can have thousands of shards
# What a stale offset table or a damaged tar gives when one sample's range is read; a missing file
# (FileNotFoundError) is not corrupt data and stops the run.
RANGE_ERRORS = (EOFError, ValueError, tarfile.TarError)


def offsets_path(url: str) -> Path:
    return Path(url + OFFSETS_SUFFIX)


def scan_offsets(url: str) -> np.ndarray:
    """The offset table of the tar at `url` (see the module docstring), from one sequential read."""
    spans: list[list[int]] = []
    key, broken = None, 0
    try:
        with tarfile.open(url, mode="r|") as tar:
            for member in tar:
                match = _KEY.match(member.name) if member.isfile() else None
                if match is None:
                    continue
                end = member.offset_data + _round_up(member.size)
                if match.group(1) == key:
                    spans[-1][1] = end - spans[-1][0]
                else:
                    key = match.group(1)
                    spans.append([member.offset, end - member.offset])
    except (tarfile.TarError, EOFError, zlib.error, ValueError):
        # The sample being read when the tar broke off may miss members: the sequential reader drops it.
        broken, spans = 1, spans[:-1]
    head = [[os.path.getsize(url), broken]]
    return np.asarray(head + spans, dtype=np.int64).reshape(-1, 2)


def write_offsets(url: str, table: np.ndarray | None = None) -> np.ndarray:
    """Scan (unless given) and write the shard's offset table atomically; returns it."""
    table = scan_offsets(url) if table is None else table
    path = offsets_path(url)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
    os.replace(tmp, path)  # ranks making the same table at once write the same bytes
    return table


def has_offsets(url: str) -> bool:
    """Whether the shard has a current offset table beside it (one of the tar's size)."""
    return current_offsets(url) is not None


def current_offsets(url: str) -> np.ndarray | None:
    """The shard's offset table if one beside it matches the tar's size, else None (nothing is made)."""
    path = offsets_path(url)
    try:
        table = np.load(path) if path.is_file() else None
        current = table is not None and table.ndim == 2 and len(table) and table[0, 0] == os.path.getsize(url)
    except (OSError, ValueError):  # an unreadable table, or the tar itself missing: read it as a tar
        return None
    return table if current else None


def load_offsets(url: str, write: bool = True) -> np.ndarray:
    """The shard's offset table: read from beside it when it matches the tar's size, else made by one read
    of the tar (and written beside it with `write`, where the folder allows)."""
    table = current_offsets(url)
    if table is not None:
        return table
    if not write:
        return scan_offsets(url)
    try:
        return write_offsets(url)
    except OSError:  # a read-only shard folder: keep the table in memory only
        return scan_offsets(url)


class TarReader:
    """Samples read by byte range, keeping a few shard files open (one per reader process)."""

    def __init__(self) -> None:
        self.files: OrderedDict[str, int] = OrderedDict()

    def read(self, url: str, offset: int, size: int) -> dict:
        """`{"__key__", "__url__", ext: bytes}` of the sample in bytes [offset, offset + size) of `url`."""
        data = os.pread(self._fd(url), size, offset)
        if len(data) != size:
            raise EOFError(f"{size} bytes at offset {offset} but the file ends after {len(data)}")
        return parse_sample(data, url)

    def close(self) -> None:
        while self.files:
            os.close(self.files.popitem()[1])

    def __del__(self) -> None:
        self.close()

    def _fd(self, url: str) -> int:
        fd = self.files.get(url)
        if fd is None:
            if len(self.files) >= _OPEN_FILES:
                os.close(self.files.popitem(last=False)[1])
            fd = self.files[url] = os.open(url, os.O_RDONLY)
        self.files.move_to_end(url)
        return fd


def parse_sample(data: bytes, url: str) -> dict:
    """The members of one sample's byte range as webdataset groups them (suffixes lowercased)."""
    sample: dict = {"__url__": url}
    for name, payload in _members(data):
        match = _KEY.match(name)
        if match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if sample.setdefault("__key__", key) != key:
            raise ValueError(f"members of two samples ({sample['__key__']!r}, {key!r}) in one index range")
        sample[suffix] = payload
    if "__key__" not in sample:
        raise ValueError("the index range holds no sample member")
    return sample


def _members(data: bytes) -> list[tuple[str, bytes]]:
    members, pos = [], 0
    while pos + _BLOCK <= len(data):
        header = data[pos : pos + _BLOCK]
        if header[156:157] not in _PLAIN or header[257:262] != b"ustar":
            return _members_by_tarfile(data)
        size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        name = header[0:100].split(b"\0")[0].decode()
        prefix = header[345:500].split(b"\0")[0].decode()
        start = pos + _BLOCK
        members.append((f"{prefix}/{name}" if prefix else name, data[start : start + size]))
        pos = start + _round_up(size)
    return members


def _members_by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _round_up(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def index_shards(urls: list[str]) -> list[str]:
    """Write the offset table of every local shard that lacks a current one (`mtdist index-shards`);
    one line per shard indexed."""
    lines = []
    for url in urls:
        if has_offsets(url):
            continue
        path, table = offsets_path(url), write_offsets(url)
        broken = ", broke off (its last sample is lost)" if table[0, 1] else ""
        lines.append(f"{path}: {len(table) - 1} samples{broken}")
    return lines
