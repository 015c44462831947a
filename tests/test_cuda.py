"""The GPU path on a GPU (`-m cuda`; `make gpu-check` runs these): flat parameter buffers (NCHW weights)
with NHWC activations, bf16 autocast student and teacher with fp32 weights, the fp32 EMA update, pinned
uint8 ImageNet batches normalized on the device, the fused optimizer, model.compile.

Skipped without CUDA. MTDIST_TEST_DEVICE=cpu runs the same tests on the CPU (`gpu_check --cpu` does, so
the tests themselves are exercised here); there the NHWC inputs of model.channels_last are applied too
(dist.NHWC_ON_CPU_ENV), pinning is not, and the compiled step is skipped (compiling it takes minutes on
2 cores; tests/test_gpu_path.py checks the compile wiring).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY

from mtdist.dist import NHWC_ON_CPU_ENV

DEVICE = os.environ.get("MTDIST_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]

# One real single-rank engine on DEVICE (its own process: a process group outlives a test), one step.
ENGINE_STEP = """
import json, sys, torch
from mtdist.config import load_config
from mtdist.ema import flat_view
from mtdist.preflight import SyntheticStep, init_single_process
device = init_single_process()
# RGB input: a 1-channel NCHW batch is NHWC too (ambiguous strides), and convolutions then keep NCHW
cfg = load_config(sys.argv[1], ["model.channels_last=true", "deepspeed.bf16=true", "data.labeled_size=80",
                                "data.unlabeled_size=240", "data.channels=3", *sys.argv[2:]])
step = SyntheticStep(cfg, device)
engine, teacher = step.engine, step.teacher
student = engine.module
dtypes = {}
def recorder(name):
    def hook(module, inputs, output):  # returns None: the output stays as it is
        dtypes.setdefault(name, str(output.dtype))
    return hook
for name, module in (("student", student), ("teacher", teacher.module)):
    module.head_cls.register_forward_hook(recorder(name))
stem_nhwc = {}
def nhwc_recorder(name):
    def hook(module, inputs, output):
        stem_nhwc.setdefault(name, output.is_contiguous(memory_format=torch.channels_last))
    return hook
for name, module in (("student", student), ("teacher", teacher.module)):
    module.stem[0].register_forward_hook(nhwc_recorder(name))
teacher_before = [p.detach().clone() for p in teacher.module.parameters()]
step(0)
expected = [torch.lerp(t, s.detach().float(), 0.5) for t, s in zip(teacher_before, student.parameters())]
ema_error = max((t - e).abs().max().item() for t, e in zip(teacher.module.parameters(), expected))
base = getattr(engine.optimizer, "optimizer", engine.optimizer)
def convs_nhwc(m):
    return all(p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() == 4)
print(json.dumps({
    "device": str(next(student.parameters()).device.type),
    "student_flat": flat_view([p.detach() for p in student.parameters()]) is not None,
    "teacher_flat": flat_view(list(teacher.module.parameters())) is not None,
    "student_nhwc": convs_nhwc(student),
    "teacher_nhwc": convs_nhwc(teacher.module),
    "stem_out_nhwc": stem_nhwc,
    "student_weights": sorted({str(p.dtype) for p in student.parameters()}),
    "teacher_weights": sorted({str(p.dtype) for p in teacher.module.parameters()}),
    "head_dtypes": dtypes,
    "ema_decay_first": 0.5,
    "ema_error": ema_error,
    "teacher_updates": teacher.updates,
    "fused": bool(base.defaults.get("fused")),
    "loss_finite": all(bool(torch.isfinite(v).all()) for v in step.window.sums.values()),
}))
"""


def run_engine_script(*overrides: str) -> dict:
    """ENGINE_STEP in a fresh process on DEVICE (on the CPU: no GPU visible to torch or DeepSpeed)."""
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    if not ON_CUDA:  # the CPU still takes the NHWC inputs of model.channels_last (dist.nhwc_inputs)
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", NHWC_ON_CPU_ENV: "1"}
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_STEP, str(TINY), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def engine_step() -> dict:
    return run_engine_script()


def test_engine_runs_on_the_device(engine_step):
    assert engine_step["device"] == DEVICE and engine_step["loss_finite"]


def test_flat_buffers_with_nhwc_activations(engine_step):
    """Student and teacher parameters each tile one flat buffer of NCHW weights (DeepSpeed's start cannot
    take NHWC ones: train.place_model), and with model.channels_last the activations are NHWC (on the
    CPU too here, by dist.NHWC_ON_CPU_ENV)."""
    assert engine_step["student_flat"] and engine_step["teacher_flat"]
    assert not engine_step["student_nhwc"] and not engine_step["teacher_nhwc"]
    assert engine_step["stem_out_nhwc"] == {"student": True, "teacher": True}


def test_bf16_autocast_student_and_teacher_with_fp32_weights(engine_step):
    assert engine_step["head_dtypes"] == {"student": "torch.bfloat16", "teacher": "torch.bfloat16"}
    assert engine_step["student_weights"] == engine_step["teacher_weights"] == ["torch.float32"]


def test_fp32_ema_update_on_the_device(engine_step):
    """teacher <- lerp(teacher, student, 1 - a), a = 0.5 at the first update, in fp32 on the device."""
    assert engine_step["teacher_updates"] == 1
    assert engine_step["ema_error"] <= 1e-6


def test_fused_optimizer(engine_step):
    assert engine_step["fused"]


def test_pinned_uint8_batches_normalized_on_the_device(tmp_path):
    """Real JPEG shards -> the train loader: uint8 packed batches, pinned on CUDA, finished (jitter and
    normalization) on the device in NHWC, equal to the same finish on the CPU."""
    from imagenet_tree import make_imagenet_tree

    from mtdist import data as mtdata
    from mtdist.data.imagenet_fast import ImagenetTrainFast
    from mtdist.data.make_shards import MakeShardsOptions, make_shards

    make_imagenet_tree(tmp_path / "src", classes=2, per_class=8, val_per_class=2)
    opts = MakeShardsOptions(
        src=tmp_path / "src", out=tmp_path / "shards", samples_per_shard=4, labels_per_class=4, progress=False
    )
    indexes = make_shards(opts).indexes
    seen: list[tuple[torch.dtype, bool, torch.Tensor]] = []

    class Recording(ImagenetTrainFast):
        def finish(self, packed: torch.Tensor, device: torch.device | None) -> torch.Tensor:
            seen.append((packed.dtype, packed.is_pinned(), packed.clone()))
            return super().finish(packed, device)

    device = torch.device(DEVICE)
    transform = Recording(size=32, device=device, channels_last=True)
    batches = mtdata.build_train_loader(
        mtdata.resolve_shards(str(indexes["train-labeled"])),
        mtdata.resolve_shards(str(indexes["train-unlabeled"])),
        labeled_per_gpu=2,
        unlabeled_per_gpu=2,
        rank=0,
        world_size=1,
        seed=0,
        transform=transform,
        channels=3,
        num_workers=0,
        shuffle_buffer=4,
        pin_memory=ON_CUDA,
    )
    view1, view2, labels = next(batches)
    assert [(dtype, pinned) for dtype, pinned, _ in seen] == [(torch.uint8, ON_CUDA)] * 2
    for view, (_, _, packed) in zip((view1, view2), list(seen), strict=True):
        assert view.device.type == DEVICE and view.dtype == torch.float32 and view.shape == (4, 3, 32, 32)
        assert view.is_contiguous(memory_format=torch.channels_last)
        on_cpu = transform.finish(packed, None)
        torch.testing.assert_close(view.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
    assert labels.tolist()[2:] == [-1, -1]
    batches.close()


@pytest.mark.skipif(not ON_CUDA, reason="compiling a step takes minutes on CPU (wiring: test_gpu_path.py)")
def test_compiled_step_on_the_device():
    """model.compile=true: student and teacher compiled in place, a real step runs, keys stay plain."""
    got = run_engine_script("model.compile=true")  # (the dtype hooks may run at trace time only: not read)
    assert got["loss_finite"] and got["teacher_updates"] == 1 and got["ema_error"] <= 1e-6
    assert got["student_weights"] == got["teacher_weights"] == ["torch.float32"]
