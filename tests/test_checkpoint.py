"""The checkpoint folder's bookkeeping in one process: `latest`, `best`, keep_last, killed saves.

The engine is a stand-in that writes a file where DeepSpeed writes its own; the real engine, two
ranks and kills are in test_resume.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY

from mtdist import checkpoint
from mtdist.checkpoint import TrainState
from mtdist.config import ConfigError, load_config


class StandInEngine:
    """DeepSpeed's save_checkpoint contract: its files go under <save_dir>/<tag>/."""

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        assert not save_latest  # mtdist keeps its own `latest`, written only when a save is complete
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {}}, folder / "mp_rank_00_model_states.pt")


def save(root: Path, state: TrainState, keep_last: int = 2) -> Path:
    meta = {"train_state": state.state_dict(), "signature": {}, "config": {}}
    rank_state = {"teacher": {"module": {"w": torch.full((2,), float(state.step))}}}
    return checkpoint.save(root, StandInEngine(), rank_state, meta, state.step, keep_last)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def test_the_best_checkpoint_outlives_keep_last_until_beaten(tmp_path):
    state = TrainState(wandb_run_id="abc")
    top1 = {2: 30.0, 4: 30.0, 6: 25.0, 8: 31.0}  # evaluations; 4 only ties 2, 6 is worse
    for step in range(1, 9):
        state.step = step
        if step in top1:
            state.note_eval(top1[step], step)
        save(tmp_path, state)
        if step == 7:
            assert names(tmp_path) == ["step-00000002", "step-00000006", "step-00000007"]
    assert checkpoint.best(tmp_path) == tmp_path / "step-00000008"
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000008"
    assert names(tmp_path) == ["step-00000007", "step-00000008"]  # step 2 went once 8 beat it
    saved = checkpoint.read_meta(tmp_path / "step-00000008")["train_state"]
    assert (saved["best_step"], saved["best_top1"]) == (8, 31.0)


def test_without_keep_best_there_is_no_best(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, TrainState(step=step))
    assert checkpoint.best(tmp_path) is None and not (tmp_path / checkpoint.BEST).exists()
    assert names(tmp_path) == ["step-00000002", "step-00000003"]


def test_a_killed_save_is_ignored_then_removed(tmp_path):
    save(tmp_path, TrainState(step=3))
    partial = tmp_path / ".tmp-step-00000006"  # what a save killed before its rename leaves
    partial.mkdir()
    torch.save({}, partial / "rank00000.pt")
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000003"
    save(tmp_path, TrainState(step=4))
    assert names(tmp_path) == ["step-00000003", "step-00000004"]


def test_latest_naming_a_vanished_folder_falls_back_to_the_newest_complete(tmp_path):
    for step in (3, 6):
        save(tmp_path, TrainState(step=step))
    (tmp_path / "step-00000009").mkdir()  # renamed but without meta.json: not complete
    (tmp_path / checkpoint.LATEST).write_text("step-00000012")
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000006"
    (tmp_path / checkpoint.LATEST).unlink()
    assert checkpoint.latest(tmp_path) is None  # no pointer: nothing was ever completed


def test_train_state_of_an_older_checkpoint_has_no_best():
    state = TrainState()
    state.load_state_dict({"step": 5, "wandb_run_id": "x"})
    assert (state.step, state.best_step, state.best_top1) == (5, 0, -1.0)
    assert state.note_eval(0.0, 6) and not state.note_eval(0.0, 7)


def test_keep_best_needs_a_validation_split():
    with pytest.raises(ConfigError, match=r"checkpoint.keep_best: needs data.val"):
        load_config(TINY, ["checkpoint.keep_best=true"])
    assert load_config(TINY, ["checkpoint.keep_best=true", "data.val=v.index.json"]).checkpoint.keep_best


def test_a_checkpoint_resumes_only_in_its_own_data_order(tmp_path):
    """A global-order checkpoint under data.order=reader and a reader-order one (its signature has no
    data.order) under data.order=global are refused; each resumes in its own order."""
    reader, ordered = load_config(TINY), load_config(TINY, ["data.order=global"])
    saved = {"global": checkpoint.signature(ordered, 1), "reader": checkpoint.signature(reader, 1)}
    assert "data.order" not in saved["reader"]  # as older and reader-order checkpoints were saved
    for now, cfg in (("reader", reader), ("global", ordered)):
        checkpoint.check_compatible(
            saved[now], checkpoint.movable_signature(cfg, 2 if now == "global" else 1), tmp_path
        )
        other = saved["global" if now == "reader" else "reader"]
        with pytest.raises(ValueError, match=r"data.order: checkpoint '\w+' vs now '" + now):
            checkpoint.check_compatible(other, checkpoint.movable_signature(cfg, 1), tmp_path)


class StandInZeroEngine:
    """What engine.load_checkpoint asks of a ZeRO engine that saves in the elastic layout (data.order=global),
    here holding a checkpoint in the rigid layout of older saves (per-rank base_optimizer_state dicts)."""

    dp_world_size = 2

    def __init__(self) -> None:
        self.loads: list[bool] = []

    def zero_optimization(self) -> bool:
        return True

    def zero_elastic_checkpoint(self) -> bool:
        return True

    def load_checkpoint(self, root: str, tag: str, load_optimizer_states: bool = True) -> None:
        self.loads.append(load_optimizer_states)

    def _get_all_zero_checkpoints(self, root: str, tag: str) -> list[dict]:
        return [{"base_optimizer_state": {"state": {}, "param_groups": []}} for _ in range(2)]


def test_a_rigid_zero_checkpoint_of_the_global_order_resumes_on_its_own_world_size():
    """DeepSpeed loads a rigid save into an elastic engine with the same partitions; only another world
    size needs the elastic layout, and is refused."""
    from mtdist.engine import load_checkpoint

    engine = StandInZeroEngine()
    load_checkpoint(engine, "ckpts", "step_4", saved_world_size=2)
    assert engine.loads[-1] is True  # the optimizer state too, by DeepSpeed's own load
    with pytest.raises(ValueError, match="rigid layout of its 4 ranks: resume it on 4 ranks"):
        load_checkpoint(StandInZeroEngine(), "ckpts", "step_4", saved_world_size=4)
