"""Atomic checkpoints on all ranks, keep-last-k, and auto-resume from the latest complete one.

Layout of `<run_dir>/checkpoints/`:
    step-00000100/            a complete checkpoint (renamed into place only once complete)
        <DeepSpeed files>     student, optimizer, lr schedule, loss scaler (engine.save_checkpoint)
        rank00000.pt ...      per rank: teacher (fp32 weights and its own BN buffers), the student's
                              BN buffers (DeepSpeed keeps rank 0's only), RNG states
        meta.json             step, world size, resolved config, W&B run id, model signature
    .tmp-step-00000200/       being written; never read, removed on the next save
    latest                    the name of the newest complete checkpoint (replaced atomically)
    best                      checkpoint.keep_best: the name of the checkpoint with the best teacher top-1
                              so far (replaced atomically); that folder is exempt from keep_last

A save is made visible by one rename, after every rank has written its files: a process killed
at any point of a save leaves `latest` naming the previous complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from mtdist.config import Config, to_dict
from mtdist.data.seeds import seed_key
from mtdist.dist import barrier
from mtdist.plan import global_batches

LATEST = "latest"
BEST = "best"
NEW_RANK_TAG = 0x4E455752  # new_rank_seed's seed_key tag ("NEWR"): apart from the data streams' small tags
# Tests only (tests/test_resume.py): "N" makes every rank block inside the save of step N, after
# writing its files into the temporary folder, until it is killed: a kill during a save, made exact.
HANG_IN_SAVE_ENV = "MTDIST_TEST_HANG_IN_SAVE"


@dataclass
class TrainState:
    """What the loop needs to continue: the optimizer step, the W&B run id, the best evaluation so far."""

    step: int = 0
    wandb_run_id: str = ""
    best_step: int = 0  # checkpoint.keep_best: step of the best evaluation so far; 0 = none yet
    best_top1: float = -1.0

    def note_eval(self, top1: float, step: int) -> bool:
        """True if `top1` beats every earlier evaluation (a tie keeps the earlier checkpoint)."""
        if top1 <= self.best_top1:
            return False
        self.best_step, self.best_top1 = step, top1
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "wandb_run_id": self.wandb_run_id,
            "best_step": self.best_step,
            "best_top1": self.best_top1,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.wandb_run_id = int(state["step"]), str(state["wandb_run_id"])
        # checkpoints written before keep_best existed have no best: start comparing afresh
        self.best_step, self.best_top1 = int(state.get("best_step", 0)), float(state.get("best_top1", -1.0))


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (every device's) global generators from one 64-bit seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def new_rank_seed(seed: int, rank: int, step: int) -> int:
    """The global generators' seed of a rank that the saved run did not have (a grown allocation):
    its own stream, reproducible from the run seed, the rank and the step it starts at."""
    return seed_key(seed, rank, step, NEW_RANK_TAG)


def signature(cfg: Config, world_size: int) -> dict[str, Any]:
    """What must match for a checkpoint to be loadable into this run exactly."""
    m, d = cfg.model, cfg.data
    # only when set: checkpoints made before the key existed stay loadable
    per_gpu = {"data.batch_size_per_gpu": d.batch_size_per_gpu} if d.batch_size_per_gpu else {}
    return (
        per_gpu
        | {
            "model.arch": m.arch,
            "model.two_heads": m.two_heads,
            "model.width": m.width,
            "model.small_input": m.small_input,
            "data.num_classes": d.num_classes,
            "data.channels": d.channels,
            "data.batch_size": d.batch_size,
            "data.labeled_batch_size": d.labeled_batch_size,
            "data.num_workers": d.num_workers,
            "seed": cfg.seed,
            "world_size": world_size,
            "deepspeed.grad_accum_steps": cfg.deepspeed.grad_accum_steps,
            "mean_teacher.enabled": cfg.mean_teacher.enabled,
        }
        | _global_order_signature(cfg, world_size)
    )


# The allocation-bound keys a data.order=global checkpoint does not need to match (the global batch does).
MOVABLE = ("world_size", "data.num_workers", "data.batch_size_per_gpu")


def _global_order_signature(cfg: Config, world_size: int) -> dict[str, Any]:
    """In the global order a global step's samples do not depend on the allocation: what must match is the
    global batch (and so the schedule in steps), not the ranks or workers (reader order: nothing added)."""
    if cfg.data.order != "global":
        return {}
    batch, labeled = global_batches(cfg, world_size)
    return {"data.order": "global", "global_batch_size": batch, "global_labeled_batch_size": labeled}


def movable_signature(cfg: Config, world_size: int) -> dict[str, Any]:
    """The signature a checkpoint must match to resume here: all of it, less MOVABLE in the global order;
    data.order always (a reader-order signature lacks it: SAVED_DEFAULTS), so neither order's checkpoint
    resumes silently in the other."""
    current = signature(cfg, world_size) | {"data.order": cfg.data.order}
    if cfg.data.order == "global":
        current = {k: v for k, v in current.items() if k not in MOVABLE}
    return current


def allocation_change(meta: dict[str, Any], world_size: int, num_workers: int) -> str:
    """'' when the checkpoint was made on this allocation, else what changed, for the log."""
    saved = meta.get("allocation") or {
        "world_size": meta["signature"].get("world_size"),
        "num_workers": meta["signature"].get("data.num_workers"),
    }
    now = {"world_size": ("ranks", world_size), "num_workers": ("loader workers", num_workers)}
    changes = [
        f"{what} {saved[key]} -> {value}"
        for key, (what, value) in now.items()
        if saved.get(key) is not None and saved[key] != value
    ]
    return ", ".join(changes)


def saved_world_size(meta: dict[str, Any], default: int) -> int:
    saved = (meta.get("allocation") or {}).get("world_size") or meta["signature"].get("world_size")
    return int(saved or default)


def source_rank(rank: int, saved_world: int) -> int:
    """The saved rank whose per-rank state (teacher, BN buffers, RNG) a rank takes on another allocation:
    its own where it existed, else rank mod saved ranks (but not that rank's RNG: new_rank_seed).
    Teacher and student weights are equal on all ranks; their BN buffers are per rank (teacher_bn=own)
    or equal (average): either way a rank continues from the statistics of a rank that saw the same
    kind of data."""
    return rank if rank < saved_world else rank % saved_world


def moved_position(meta: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """A rank's data position on another allocation (global order): the saved step, and per stream the
    corrupt samples dropped by the saved ranks it inherits (saved rank o goes to rank o mod world_size),
    so the run's total stays exact; the loader's record puts a total on worker 0 (ordered.take_skipped)
    and, `moved`, restarts each reader's error bound."""
    positions = meta.get("data_positions") or []
    if not positions:
        return {}
    batches = {p["batches"] for p in positions}
    if len(batches) != 1:
        raise ValueError(f"the saved ranks' positions differ ({sorted(batches)}): not a global-order save")
    streams = positions[0]["skipped"]
    skipped = {
        name: [sum(sum(p["skipped"][name]) for o, p in enumerate(positions) if o % world_size == rank)]
        for name in streams
    }
    return {"batches": batches.pop(), "skipped": skipped, "moved": True}


# Signature keys a checkpoint may lack, with the value that absence stands for.
SAVED_DEFAULTS = {"data.order": "reader"}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint made for another model or run shape, listing every difference."""
    saved = SAVED_DEFAULTS | saved
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}" for k, v in current.items() if saved.get(k) != v
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {path} was made for a different run ({'; '.join(diffs)}); resume with the same "
            "settings, or start a new run_dir (checkpoint.resume=never)"
        )


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank{rank:05d}.pt"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    root: Path, engine: Any, rank_state: dict[str, Any], meta: dict[str, Any], step: int, keep_last: int
) -> Path:
    """Every rank calls this. Visible (renamed and named in `latest`) only when all ranks finished.

    When meta's train state names this step as the best (checkpoint.keep_best), `best` names it too.
    """
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    tag, tmp_tag = tag_for(step), f".tmp-{tag_for(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / tmp_tag, ignore_errors=True)  # a save killed earlier
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False)
    torch.save(rank_state, _rank_file(root / tmp_tag, rank))
    _hang_if_testing(root / tmp_tag, step, rank)
    barrier()  # every rank's files are on disk
    if rank == 0:
        _write_atomic(root / tmp_tag / "meta.json", json.dumps(meta, indent=1))
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(root / tmp_tag, final)
        _write_atomic(root / LATEST, tag)
        if meta["train_state"].get("best_step") == step:
            _write_atomic(root / BEST, tag)
        best_folder = best(root)
        prune(root, keep_last, keep={tag} | ({best_folder.name} if best_folder else set()))
    barrier()
    return root / tag


def _hang_if_testing(folder: Path, step: int, rank: int) -> None:
    """HANG_IN_SAVE_ENV: block here (files written, nothing renamed) until killed; tests only."""
    if os.environ.get(HANG_IN_SAVE_ENV) != str(step):
        return
    (folder / f"hanging-rank{rank:05d}").touch()
    while True:
        time.sleep(1)


def prune(root: Path, keep_last: int, keep: set[str]) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` except those in `keep` (the newest and
    the best), and stale temporaries of killed saves."""
    complete = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    for name in complete[:-keep_last]:
        if name not in keep:
            shutil.rmtree(root / name, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint: `latest` names only folders that were renamed into place.

    Should the folder it names be gone (a save of the same step killed between removing the old
    folder and renaming the new one), the newest complete folder is taken instead.
    """
    folder = _pointed(root / LATEST)
    if folder is not None or not (root / LATEST).is_file():
        return folder
    complete = sorted(p for p in root.glob("step-*") if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def best(root: Path) -> Path | None:
    """The checkpoint with the best teacher top-1 so far (checkpoint.keep_best), if any."""
    return _pointed(root / BEST)


def _pointed(pointer: Path) -> Path | None:
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "meta.json").is_file() else None


def find_resume(cfg: Config, root: Path) -> Path | None:
    """checkpoint.resume: auto = latest complete one if any; never; or an explicit folder."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode == "auto":
        return latest(root)
    folder = Path(mode)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint.resume: {folder} is not a complete checkpoint (no meta.json)")
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def load_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    path = _rank_file(folder, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: checkpoint {folder} was written by fewer ranks")
    return torch.load(path, map_location="cpu", weights_only=True)


def make_meta(
    cfg: Config, state: TrainState, world_size: int, data_positions: list[dict] | None = None
) -> dict[str, Any]:
    """`data_positions`: every rank's data position, in rank order (a resume on another allocation)."""
    return {
        "train_state": state.state_dict(),
        "signature": signature(cfg, world_size),
        "config": to_dict(cfg),
        "allocation": {"world_size": world_size, "num_workers": cfg.data.num_workers},
        "data_positions": data_positions or [],
    }
