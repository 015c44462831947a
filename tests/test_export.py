"""`mtdist export`: torchvision's key names for the ResNets (against a reference list kept here), and a
real checkpoint's export that loads with mtdist.models.load_exported and scores as `mtdist eval` does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, run_python, shard_overrides

from mtdist import checkpoint
from mtdist import data as mtdata
from mtdist.models import build_model, load_exported
from mtdist.models.io import from_torchvision_names, read_export_info, read_weights, to_torchvision_names

REFERENCE = Path(__file__).parent / "data" / "torchvision_resnet152_keys.txt"
TORCHVISION_RESNET152_PARAMETERS = 60_192_808  # as torchvision documents resnet152's weights
STEPS = 60  # 2 epochs of the tiny config: about 3 s


def reference_shapes() -> dict[str, tuple[int, ...]]:
    rows = [line.split() for line in REFERENCE.read_text().splitlines() if not line.startswith("#")]
    return {key: () if shape == "-" else tuple(int(n) for n in shape.split("x")) for key, shape in rows}


def test_reference_list_is_torchvisions_resnet152():
    """The list itself: 932 tensors, and its parameters (not BN buffers) add up to torchvision's count."""
    ref = reference_shapes()
    assert len(ref) == 932
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    params = sum(torch.Size(s).numel() for k, s in ref.items() if not k.endswith(buffers))
    assert params == TORCHVISION_RESNET152_PARAMETERS


def test_resnet152_export_names_are_torchvisions():
    """Every key and shape of our ResNet-152 (class head only, as exported) maps onto torchvision's."""
    with torch.device("meta"):
        model = build_model("resnet152", 1000, two_heads=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head_cons.")}
    renamed = to_torchvision_names(state)
    assert {k: tuple(v.shape) for k, v in renamed.items()} == reference_shapes()
    assert from_torchvision_names(renamed).keys() == state.keys()
    both = to_torchvision_names(model.state_dict())  # --both-heads: the second head is fc_cons
    assert set(both) - set(renamed) == {"fc_cons.weight", "fc_cons.bias"}


def test_export_refuses_an_unknown_suffix(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtdist", "export", "--checkpoint", str(tmp_path), "--out", "w.bin"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "name it *.safetensors, or *.pt / *.pth" in proc.stderr


@pytest.fixture(scope="module")
def trained(mnist_shards, tmp_path_factory) -> Path:
    """A real single-process `mtdist train` of the tiny config (fp32, so eval and export compare exactly)."""
    run_dir = tmp_path_factory.mktemp("export_run")
    args = [*shard_overrides(mnist_shards), f"logging.run_dir={run_dir}", f"schedule.max_steps={STEPS}"]
    run_python(["-m", "mtdist", "train", "--config", str(TINY), *args, "deepspeed.bf16=false"], threads=2)
    return run_dir


def top1_top5(model: torch.nn.Module, spec: str) -> tuple[float, float, int]:
    """Top-1 and top-5 (percent) of the class head over a shard spec, with mtdist's eval transform."""
    _, eval_tf = mtdata.make_transforms("digits", 28, 1)
    batches = mtdata.build_eval_loader(
        mtdata.resolve_shards(spec),
        batch_size=64,
        rank=0,
        world_size=1,
        transform=eval_tf,
        channels=1,
        num_workers=0,
        num_classes=10,
    )
    hits1 = hits5 = count = 0
    with torch.no_grad():
        for images, labels, _ in batches:
            top5 = model(images)[0].topk(5, dim=1).indices
            hits1 += int((top5[:, 0] == labels).sum())
            hits5 += int((top5 == labels[:, None]).any(1).sum())
            count += labels.numel()
    return 100.0 * hits1 / count, 100.0 * hits5 / count, count


@pytest.mark.slow
def test_exported_teacher_and_student_score_as_mtdist_eval(trained, mnist_shards, tmp_path):
    folder = checkpoint.latest(trained / "checkpoints")
    proc = run_python(["-m", "mtdist", "eval", "--checkpoint", str(folder)], threads=2)
    scores = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert scores["step"] == STEPS and scores["val/count"] == 120

    teacher_file, student_file = tmp_path / "teacher.safetensors", tmp_path / "student.pt"
    # the checkpoints/ folder means its latest checkpoint
    out = run_python(
        ["-m", "mtdist", "export", "--checkpoint", str(trained / "checkpoints"), "--out", str(teacher_file)]
    )
    assert "BN statistics: the teacher's own" in out.stdout
    run_python(
        [
            "-m",
            "mtdist",
            "export",
            "--checkpoint",
            str(folder),
            "--which",
            "student",
            "--out",
            str(student_file),
        ]
    )

    saved = torch.load(folder / "rank00000.pt", map_location="cpu", weights_only=True)["teacher"]["module"]
    for which, path in (("teacher", teacher_file), ("student", student_file)):
        model = load_exported(path)
        assert not model.training and model.export_info["which"] == which
        assert model.export_info["source"]["step"] == STEPS
        top1, top5, count = top1_top5(model, mnist_shards["val"])
        assert count == 120
        assert top1 == pytest.approx(scores[f"val/{which}/top1"], abs=1e-9), which
        assert top5 == pytest.approx(scores[f"val/{which}/top5"], abs=1e-9), which

    # the teacher file holds the checkpoint's fp32 EMA weights and rank 0's BN buffers, bit for bit
    tensors = from_torchvision_names(read_weights(teacher_file))
    assert tensors.keys() == {k for k in saved if not k.startswith("head_cons.")}
    for k, v in tensors.items():
        assert v.dtype == saved[k].dtype and torch.equal(v, saved[k]), k
    info = read_export_info(teacher_file)
    assert info["key_names"] == "torchvision" and "conv1.weight" in read_weights(teacher_file)
    assert info["model"] | {"two_heads": True} == {
        "arch": "resnet18",
        "num_classes": 10,
        "two_heads": True,
        "small_input": True,
        "in_channels": 1,
        "input_size": 28,
        "width": 4,
    }
    assert "rank 0's" in info["bn_statistics"] and info["dtype"] == "float32"
    assert info["input"]["mean"] == [mtdata.transforms.DIGITS_MEAN]


def test_export_info_states_the_runs_scaled_ema_decay(tmp_path):
    """At 4 x data.reference_batch_size with power scaling the teacher trained with decay ** 4, as the
    plan's batch scaling gives it (and data.batch_size_per_gpu: the saved world size sets the batch)."""
    from mtdist.config import load_config
    from mtdist.export import export_info
    from mtdist.plan import batch_scaling

    over = ["data.reference_batch_size=4", "mean_teacher.ema_decay_scaling=power"]
    for extra, world in (([], 1), (["data.batch_size_per_gpu=8"], 2)):
        cfg = load_config(TINY, over + extra)
        meta = {
            "train_state": {"step": 3},
            "signature": {"world_size": world},
            "allocation": {"world_size": world},
        }
        source = export_info(cfg, tmp_path, meta, "teacher", True, 0)["source"]
        assert source["ema_decay"] == pytest.approx(0.99 ** (16 / 4)) == batch_scaling(cfg, 16).ema_decay
        assert source["ema_decay"] != cfg.mean_teacher.ema_decay
        assert export_info(cfg, tmp_path, meta, "student", True, 0)["source"]["ema_decay"] is None
