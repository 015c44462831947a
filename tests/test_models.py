"""Tests for mtdist.models: parameter counts, head wiring, stems, channels_last and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtdist.models import ARCHS, build_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_model(arch: str, **kwargs: object) -> nn.Module:
    # Parameter counting needs no real storage; the meta device keeps the 60 M-parameter nets cheap.
    with torch.device("meta"):
        return build_model(arch, 1000, **kwargs)


@pytest.mark.parametrize(
    ("arch", "two_heads", "expected"),
    [
        ("resnet18", False, 11_689_512),
        ("resnet50", False, 25_557_032),
        ("resnet152", False, 60_192_808),
        ("resnext152_32x4d", True, 62_000_400),
    ],
)
def test_param_counts_match_references(arch: str, two_heads: bool, expected: int) -> None:
    assert _n_params(_meta_model(arch, two_heads=two_heads)) == expected


def test_param_count_on_real_cpu_model() -> None:
    # Guard against the meta-device path hiding a difference in the real construction.
    assert _n_params(build_model("resnet18", 1000, two_heads=False)) == 11_689_512


def test_second_head_adds_one_linear() -> None:
    one = _n_params(_meta_model("resnext152_32x4d", two_heads=False))
    two = _n_params(_meta_model("resnext152_32x4d", two_heads=True))
    assert two - one == 2048 * 1000 + 1000


def test_resnext_first_stage_is_grouped_128_wide() -> None:
    block = _meta_model("resnext152_32x4d").layer1[0]
    assert block.conv2.groups == 32
    assert block.conv2.in_channels == block.conv2.out_channels == 128
    assert block.conv2.stride == (1, 1)


def test_bottleneck_strides_on_the_3x3() -> None:
    block = _meta_model("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)


def _tiny(arch: str, num_classes: int = 5, **kwargs: object) -> nn.Module:
    in_channels = kwargs.pop("in_channels", 1 if arch == "mlp" else 3)
    width = kwargs.pop("width", 8)
    input_size = kwargs.pop("input_size", 28 if arch == "mlp" else 32)
    torch.manual_seed(0)
    return build_model(
        arch, num_classes, in_channels=in_channels, width=width, input_size=input_size, **kwargs
    ).eval()


def _input(arch: str, batch: int = 2, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    if arch == "mlp":
        return torch.randn(batch, 1, 28, 28)
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_two_heads_shapes_and_differ(arch: str) -> None:
    model = _tiny(arch)
    with torch.no_grad():
        out = model(_input(arch))
    assert isinstance(out, tuple) and len(out) == 2
    cls, cons = out
    assert cls.shape == cons.shape == (2, 5)
    assert not torch.allclose(cls, cons)
    assert torch.isfinite(cls).all() and torch.isfinite(cons).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_one_head_returns_same_tensor(arch: str) -> None:
    model = _tiny(arch, two_heads=False)
    assert model.head_cons is None
    with torch.no_grad():
        cls, cons = model(_input(arch))
    assert cls.shape == (2, 5)
    assert cls is cons


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_are_separate_parameters_on_shared_features(arch: str) -> None:
    model = _tiny(arch)
    assert isinstance(model.head_cls, nn.Linear) and isinstance(model.head_cons, nn.Linear)
    assert model.head_cls.in_features == model.head_cons.in_features == model.feature_dim
    assert model.head_cls.weight.data_ptr() != model.head_cons.weight.data_ptr()
    # A loss on the consistency head alone must train that head and the body, never the class head.
    model.train()
    _, cons = model(_input(arch, batch=4))
    cons.sum().backward()
    assert model.head_cls.weight.grad is None
    assert model.head_cons.weight.grad is not None and model.head_cons.weight.grad.abs().sum() > 0


def test_unknown_arch_raises_and_lists_archs() -> None:
    with pytest.raises(ValueError, match="resnet9000") as info:
        build_model("resnet9000", 10)
    for arch in ARCHS:
        assert arch in str(info.value)


def test_archs_list() -> None:
    assert ARCHS == (
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "resnext152_32x4d",
        "mlp",
        "cnn_small",
    )


def test_small_input_stem_at_28x28_grayscale() -> None:
    model = _tiny("resnet18", num_classes=10, small_input=True, in_channels=1)
    stem_convs = [m for m in model.stem.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in stem_convs] == [(3, 3)] and stem_convs[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        stem_out = model.stem(x)
        cls, cons = model(x)
    assert stem_out.shape == (3, 8, 28, 28)
    assert cls.shape == cons.shape == (3, 10)


def test_default_stem_downsamples_4x() -> None:
    model = _tiny("resnet18")
    with torch.no_grad():
        assert model.stem(torch.randn(1, 3, 64, 64)).shape == (1, 8, 16, 16)


def test_width_scales_feature_dim() -> None:
    assert _tiny("resnet18", width=8).feature_dim == 64
    assert _tiny("resnet50", width=8).feature_dim == 256
    assert _meta_model("resnet50").feature_dim == 2048
    assert _tiny("cnn_small", width=8).feature_dim == 32
    assert _tiny("mlp").feature_dim == 512


def test_mlp_layout() -> None:
    model = _tiny("mlp", dropout=0.3)
    kinds = [type(m) for m in model.body]
    assert kinds == [
        nn.Flatten,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
    ]
    assert model.body[1].in_features == 28 * 28
    assert isinstance(model.head_dropout, nn.Dropout) and model.head_dropout.p == 0.3


def test_dropout_is_active_only_in_train_mode() -> None:
    model = _tiny("cnn_small", dropout=0.5)
    x = _input("cnn_small", batch=4)
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(2)
        c = model(x)[0]
        torch.manual_seed(3)
        d = model(x)[0]
    assert not torch.allclose(c, d)


def test_init_kaiming_bn_and_zero_init_residual() -> None:
    model = _tiny("resnet50")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    conv = model.layer1[0].conv2
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.1)

    zeroed = _tiny("resnet50", zero_init_residual=True)
    for stage in (zeroed.layer1, zeroed.layer2, zeroed.layer3, zeroed.layer4):
        for block in stage:
            assert torch.count_nonzero(block.bn3.weight) == 0
            assert torch.count_nonzero(block.bn2.weight) == block.bn2.weight.numel()
    basic = _tiny("resnet18", zero_init_residual=True)
    assert torch.count_nonzero(basic.layer3[1].bn2.weight) == 0


def test_channels_last_matches_contiguous() -> None:
    model = _tiny("resnet18")
    x = _input("resnet18")
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        out = model_cl(x.to(memory_format=torch.channels_last))
    for r, o in zip(ref, out, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnext152_32x4d", "cnn_small", "mlp"])
def test_channels_last_bf16_autocast_forward_and_backward(arch: str) -> None:
    model = _tiny(arch).train()
    model = model.to(memory_format=torch.channels_last)
    x = _input(arch, batch=4).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, cons = model(x)
        loss = cls.float().logsumexp(1).mean() + cons.float().logsumexp(1).mean()
    assert cls.dtype == cons.dtype == torch.bfloat16
    assert cls.shape == (4, 5)
    assert torch.isfinite(cls.float()).all() and torch.isfinite(cons.float()).all()
    loss.backward()
    # Weights stay fp32 under autocast; gradients must reach the stem.
    first = next(p for p in model.parameters() if p.dim() > 1)
    assert first.dtype == torch.float32 and first.grad is not None and torch.isfinite(first.grad).all()
