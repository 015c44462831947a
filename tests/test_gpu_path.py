"""The GPU path, checked where no GPU is: channels_last storage the EMA still reaches, fused optimizer
choice, explicit gradient clipping, compile and autocast wiring of the real engine."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import TINY, run_python

from mtdist.config import load_config
from mtdist.ema import Teacher, flat_view, flatten_parameters_
from mtdist.engine import build_optimizer, optimizer_kernel
from mtdist.models import build_model
from mtdist.plan import deepspeed_config


def channels_last_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", 10, width=4, small_input=True).to(memory_format=torch.channels_last)


def test_flatten_keeps_channels_last_in_one_buffer():
    model = channels_last_model(0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    flat = flatten_parameters_(model)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert flat_view(list(model.parameters())) is not None
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k


def test_teacher_update_reaches_channels_last_weights():
    """One lerp_ over the flat buffers moves every teacher tensor, conv weights included."""
    student, teacher_module = channels_last_model(0), channels_last_model(1)
    flatten_parameters_(student)
    expected = {
        k: torch.lerp(t.detach(), s.detach(), 0.5)  # a = min(1 - 1/2, decay) at the first update
        for (k, t), s in zip(teacher_module.named_parameters(), student.parameters(), strict=True)
    }
    teacher = Teacher(teacher_module, decay=0.99, autocast_dtype=None)
    assert teacher.update(student) == 0.5
    for k, t in teacher.module.named_parameters():
        assert torch.allclose(t, expected[k], atol=1e-6), k
    assert teacher.module.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_teacher_update_of_a_student_in_another_memory_layout():
    """ZeRO 1/2 re-point the student's weights into DeepSpeed's own flat NCHW buffer while the teacher's
    stay channels_last: the two flat buffers order conv weights differently, so the update must pair the
    tensors, not the buffers (one lerp_ of the buffers was off by up to ~3 on this model)."""
    student, teacher_module = build_model("resnet18", 10, width=4, small_input=True), channels_last_model(1)
    flatten_parameters_(student)  # one flat NCHW buffer, as DeepSpeed's ZeRO 1/2 leave the student
    assert flat_view([p.detach() for p in student.parameters()]) is not None
    expected = {
        k: torch.lerp(t.detach(), s.detach(), 0.5)
        for (k, t), s in zip(teacher_module.named_parameters(), student.parameters(), strict=True)
    }
    teacher = Teacher(teacher_module, decay=0.99, autocast_dtype=None)
    assert teacher.update(student) == 0.5
    for k, t in teacher.module.named_parameters():
        assert torch.allclose(t, expected[k], atol=1e-6), k


def test_teacher_refuses_a_module_moved_after_it_was_built():
    """A .to() after Teacher() would leave the EMA updating a buffer the forward no longer reads."""
    student = build_model("resnet18", 10, width=4, small_input=True)
    flatten_parameters_(student)
    teacher = Teacher(copy.deepcopy(student), decay=0.99, autocast_dtype=None)
    teacher.module.to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="no longer view its flat fp32 buffer"):
        teacher.update(student)


def test_fused_optimizer_where_torch_has_one_foreach_elsewhere():
    assert optimizer_kernel("cuda", torch.optim.SGD) == {"fused": True}
    assert optimizer_kernel("cuda", torch.optim.AdamW) == {"fused": True}
    assert optimizer_kernel("cpu", torch.optim.SGD) == {"fused": True}  # torch >= 2.4 (we pin 2.13)
    assert optimizer_kernel("meta", torch.optim.SGD) == {"foreach": True}
    assert optimizer_kernel("cuda", torch.optim.Adadelta) == {"foreach": True}  # no fused kernel
    cfg = load_config(TINY)
    opt = build_optimizer(cfg, build_model("resnet18", 10, width=4))
    assert opt.defaults["fused"] is True and not opt.defaults.get("foreach")


def test_gradient_clipping_is_explicit():
    """DeepSpeed's default clips at norm 1.0: "off" must be written out as 0."""
    cfg = load_config(TINY)
    assert deepspeed_config(cfg, 8)["gradient_clipping"] == 0.0
    assert deepspeed_config(load_config(TINY, ["optim.grad_clip=2.5"]), 8)["gradient_clipping"] == 2.5


WIRING = """
import json, torch
from mtdist.config import load_config
from mtdist.preflight import SyntheticStep, init_single_process
cfg = load_config({tiny!r}, ["model.compile=true", "data.labeled_size=80", "data.unlabeled_size=240"])
step = SyntheticStep(cfg, init_single_process())
engine, teacher = step.engine, step.teacher
print(json.dumps({{
    "student_compiled": engine.module._compiled_call_impl is not None,
    "teacher_compiled": teacher.module._compiled_call_impl is not None,
    "plain_keys": not any("_orig_mod" in k for k in engine.module.state_dict()),
    "autocast": engine.torch_autocast_enabled(),
    "autocast_dtype": str(engine.torch_autocast_dtype()),
    "teacher_dtype": str(teacher.autocast_dtype),
    "self_allreduce": engine.enable_backward_allreduce,
    "clip": engine.gradient_clipping(),
    "low_precision_comm": any(hasattr(p, "comm_dtype") for p in engine.module.parameters()),
}}))
"""


def test_real_engine_wiring_compile_autocast_single_rank():
    """model.compile=true compiles student and teacher in place; bf16 is autocast (fp32 weights); one
    rank skips DeepSpeed's all-reduce with itself; no hidden clipping. (Compiling a step on 2 CPU
    cores takes minutes, so the step itself is not run here.)"""
    proc = run_python(["-c", WIRING.format(tiny=str(TINY))], timeout=300)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "student_compiled": True,
        "teacher_compiled": True,
        "plain_keys": True,
        "autocast": True,
        "autocast_dtype": "torch.bfloat16",
        "teacher_dtype": "torch.bfloat16",
        "self_allreduce": False,
        "clip": 0.0,
        "low_precision_comm": False,  # grads all-reduced in fp32 at every ZeRO stage (plan.deepspeed_config)
    }


def test_deepspeed_is_told_the_gpu_the_student_is_on():
    """DeepSpeed would otherwise set cuda:LOCAL_RANK, which does not exist where Slurm gives each task one
    GPU (--gpus-per-task=1: cuda:0 on every rank, as dist.pick_device chose)."""
    from mtdist.engine import engine_args

    assert engine_args(torch.device("cuda", 0)).device_rank == 0
    assert engine_args(torch.device("cuda", 3)).device_rank == 3
    assert engine_args(torch.device("cpu")) is None  # DeepSpeed's CPU accelerator: as before


LAYOUTS = """
import json, torch, deepspeed
from mtdist.ema import flatten_parameters_
from mtdist.models import build_model
from mtdist.preflight import init_single_process
init_single_process()
config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True}

def engine(model):
    flatten_parameters_(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)[0]

try:
    engine(build_model("resnet18", 10, width=4, small_input=True).to(memory_format=torch.channels_last))
    nhwc_weights = "accepted"
except RuntimeError as err:
    nhwc_weights = str(err)
student = engine(build_model("resnet18", 10, width=4, small_input=True))  # NCHW weights, as place_model
seen = []
nhwc = torch.channels_last
student.module.stem[0].register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=nhwc)))
x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)  # as to_device on CUDA
loss = student(x)[0].logsumexp(1).mean()
student.backward(loss)
student.step()
print(json.dumps({"nhwc_weights": nhwc_weights, "activations_nhwc": seen, "loss": float(loss)}))
"""


def test_deepspeed_takes_nchw_weights_with_nhwc_activations():
    """Why model.channels_last leaves the weights NCHW (train.place_model): the real engine, at its
    start, broadcasts every parameter viewed as bytes, which an NHWC conv weight cannot be. NCHW weights
    with an NHWC input batch train, and the activations stay NHWC (on CPU here; cuDNN the same)."""
    got = json.loads(run_python(["-c", LAYOUTS], timeout=300).stdout.strip().splitlines()[-1])
    assert "must be 1 to view Float as Byte" in got["nhwc_weights"], got
    assert got["activations_nhwc"] == [True] and math.isfinite(got["loss"]), got
