"""The trained state in a run folder's last checkpoint, to compare runs bitwise (test_resume, test_slurm)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtdist import checkpoint


def final_state(run_dir: Path, steps: int, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """Student, optimizer (DeepSpeed's file) and every rank's teacher of the checkpoint at `steps`."""
    folder = checkpoint.latest(run_dir / "checkpoints")
    assert folder is not None and folder.name == checkpoint.tag_for(steps), folder
    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    out = {"student": model["module"], "optimizer": _tensors(model["optimizer"])}
    for r in range(world_size):
        out[f"rank{r}"] = checkpoint.load_rank_state(folder, r)["teacher"]["module"]
    return out


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    return {k: v for key, val in items for k, v in _tensors(val, f"{prefix}/{key}").items()}


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}:{k} differs"
