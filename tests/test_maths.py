"""The Mean Teacher maths against hand-computed values (paper and authors' ramps.py / losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from mtdist.ema import Teacher, flat_view, flatten_parameters_
from mtdist.losses import (
    consistency_loss,
    kl_consistency,
    logit_distance,
    mse_consistency,
    supervised_loss,
    topk_correct,
)
from mtdist.models import build_model
from mtdist.schedules import (
    consistency_weight,
    cosine_rampdown,
    ema_decay,
    learning_rate,
    linear_rampup,
    sigmoid_rampup,
)
from mtdist.step import LossWeights, compute_losses


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))  # 0.006738
    assert sigmoid_rampup(2.5, 5) == pytest.approx(math.exp(-1.25))  # 0.286505
    assert sigmoid_rampup(5, 5) == 1.0 and sigmoid_rampup(9, 5) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def test_linear_rampup_and_cosine_rampdown():
    assert linear_rampup(0.5, 2) == 0.25 and linear_rampup(3, 2) == 1.0 and linear_rampup(1, 0) == 1.0
    assert cosine_rampdown(0, 75) == 1.0
    assert cosine_rampdown(37.5, 75) == pytest.approx(0.5)
    assert cosine_rampdown(60, 75) == pytest.approx(0.5 * (math.cos(math.pi * 0.8) + 1))  # 0.0954915
    with pytest.raises(ValueError, match="outside"):
        cosine_rampdown(76, 75)


def test_learning_rate_is_the_papers_imagenet_schedule():
    kw = {"lr": 0.25, "warmup_start_lr": 0.1, "warmup_epochs": 2, "rampdown_epochs": 75}
    assert learning_rate(0, **kw) == pytest.approx(0.1)
    # epoch 1: warm-up halfway (0.175) times cos ramp 0.5 (cos(pi/75) + 1) = 0.99956142
    assert learning_rate(1, **kw) == pytest.approx(0.175 * 0.9995614, rel=1e-6)
    assert learning_rate(2, **kw) == pytest.approx(0.25 * 0.5 * (math.cos(2 * math.pi / 75) + 1))
    assert learning_rate(60, **kw) == pytest.approx(0.25 * 0.0954915, rel=1e-5)


def test_consistency_weight_uses_the_integer_epoch():
    assert consistency_weight(0.9, weight=10, rampup_epochs=5) == pytest.approx(10 * math.exp(-5))
    assert consistency_weight(1.0, weight=10, rampup_epochs=5) == pytest.approx(10 * math.exp(-5 * 0.64))
    assert consistency_weight(7.5, weight=10, rampup_epochs=5) == 10.0


def test_ema_decay_warms_up_as_a_plain_average():
    assert ema_decay(1, 0.9997) == 0.5
    assert ema_decay(3, 0.9997) == 0.75
    assert ema_decay(9, 0.99) == pytest.approx(0.9)
    assert ema_decay(10**6, 0.9997) == 0.9997
    with pytest.raises(ValueError):
        ema_decay(0, 0.99)


def test_supervised_loss_ignores_unlabeled_and_divides_by_full_batch():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, -1, -1])
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 4  # (0.126928 + 0.693147) / 4
    assert supervised_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_kl_and_mse_consistency_hand_computed():
    s = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # softmax: [.5,.5], [.75,.25]
    t = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])  # softmax: [.75,.25], [.5,.5]
    kl_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl_2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_consistency(s, t).item() == pytest.approx((kl_1 + kl_2) / 2, rel=1e-5)
    # squared softmax difference summed over classes / 2 classes, averaged over 2 samples
    assert mse_consistency(s, t).item() == pytest.approx((0.125 / 2 + 0.125 / 2) / 2, rel=1e-5)
    assert consistency_loss("kl", s, s).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError):
        consistency_loss("l1", s, t)


def test_logit_distance_and_topk():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    assert logit_distance(a, b).item() == pytest.approx((4 + 3) / 3 / 2)
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05]])
    assert topk_correct(logits, torch.tensor([1, 2]), ks=(1, 2)) == [1, 1]


def test_consistency_gradient_reaches_student_consistency_head_and_never_the_teacher():
    """The pitfall of a popular reimplementation: comparing the teacher with itself (no gradient)."""
    torch.manual_seed(0)
    student = build_model("mlp", 4, input_size=6, in_channels=1, two_heads=True)
    teacher = Teacher(
        build_model("mlp", 4, input_size=6, in_channels=1, two_heads=True), decay=0.99, autocast_dtype=None
    )
    x = torch.randn(8, 1, 6, 6)
    labels = torch.full((8,), -1)  # unlabeled: only the consistency term acts
    terms = compute_losses(student(x), teacher(x)[0], labels, LossWeights("mse", 1.0, 0.0))
    terms["train/loss_total"].backward()
    assert student.head_cons.weight.grad.abs().sum() > 0
    assert student.head_cls.weight.grad is None or student.head_cls.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in teacher.module.parameters())
    assert not any(p.requires_grad for p in teacher.module.parameters())


def test_fused_teacher_update_matches_the_per_parameter_formula():
    torch.manual_seed(0)
    student, teacher_net = build_model("resnet18", 10, width=8), build_model("resnet18", 10, width=8)
    before = [p.clone() for p in teacher_net.parameters()]
    teacher = Teacher(teacher_net, decay=0.9997, autocast_dtype=torch.bfloat16)
    assert teacher.update(student) == 0.5
    for p_t, p_0, p_s in zip(teacher.module.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(p_t, 0.5 * p_0 + 0.5 * p_s)
        assert p_t.dtype == torch.float32
    assert teacher.update(student) == pytest.approx(2 / 3)
    assert teacher.updates == 2


def test_flat_update_equals_foreach_update():
    torch.manual_seed(0)
    student = build_model("resnet18", 10, width=8)
    t_flat = Teacher(build_model("resnet18", 10, width=8), decay=0.9, autocast_dtype=None)
    t_each = Teacher(build_model("resnet18", 10, width=8), decay=0.9, autocast_dtype=None)
    t_each.load_state_dict(t_flat.state_dict())
    t_each.update(student)  # student parameters are separate tensors: the foreach path
    before = [p.clone() for p in student.parameters()]
    flat = flatten_parameters_(student)
    assert flat_view(list(student.parameters())) is not None and flat.numel() == sum(
        p.numel() for p in before
    )
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    t_flat.update(student)
    for a, b in zip(t_flat.module.parameters(), t_each.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_update_follows_a_student_whose_parameters_moved():
    """The student's parameters are looked up once; re-pointing any of them must not leave a stale view."""
    torch.manual_seed(0)
    student = build_model("mlp", 4, input_size=6, in_channels=1)
    teacher = Teacher(build_model("mlp", 4, input_size=6, in_channels=1), decay=0.5, autocast_dtype=None)
    teacher.update(student)  # separate tensors: the foreach path, cached
    flat = flatten_parameters_(student)  # every parameter moves into one new buffer
    flat.add_(1.0)
    middle = list(student.parameters())[1]
    middle.data = middle.detach() + 2.0  # one parameter moves again, out of the buffer
    pairs = zip(teacher.module.parameters(), student.parameters(), strict=True)
    expected = [0.5 * t.detach() + 0.5 * s.detach() for t, s in pairs]
    teacher.update(student)
    for t, e in zip(teacher.module.parameters(), expected, strict=True):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-7)
    flatten_parameters_(student)  # tiles one buffer again: the single lerp_ path
    assert isinstance(teacher._student_source(student), torch.Tensor)


def test_teacher_forward_runs_in_autocast_with_fp32_weights():
    teacher = Teacher(
        build_model("resnet18", 10, width=8, small_input=True), decay=0.99, autocast_dtype=torch.bfloat16
    )
    out = teacher(torch.randn(2, 3, 16, 16))[0]
    assert out.dtype == torch.bfloat16 and not out.requires_grad
    assert next(teacher.module.parameters()).dtype == torch.float32


def test_bf16_ema_would_stall_but_fp32_does_not():
    """Why the teacher is fp32: at decay 0.9997 one update moves 3e-4 of the gap, below bf16 resolution."""
    t32, s = torch.ones(1000), torch.full((1000,), 1.01)
    t16 = t32.to(torch.bfloat16)
    for _ in range(10):
        t32.lerp_(s, 3e-4)
        t16.lerp_(s.to(torch.bfloat16), 3e-4)
    assert (t32 > 1).all() and (t16 == 1).all()
