"""model.sync_bn: BatchNorm statistics over a group of ranks, on CPU with gloo (torch's SyncBatchNorm refuses
CPU tensors). Two ranks, each with half of a batch, must compute what one process computes over the whole
batch: outputs, input gradients, parameter gradients (summed, as the data-parallel average then scales
them) and running statistics."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn

from mtdist import sync_bn
from mtdist.ema import flat_view, flatten_parameters_
from mtdist.models import build_model
from mtdist.sync_bn import GroupSyncBatchNorm, convert_sync_batchnorm

WORLD = 2


def _batch(dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of 8 (channels 3) and fixed loss weights: the same on every rank."""
    g = torch.Generator().manual_seed(0)
    shape = (8, 3, 5, 4) if dims == 4 else (8, 3)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    return x, torch.randn(shape, generator=g)


def _reference(dims: int) -> dict[str, torch.Tensor]:
    """One process, plain BatchNorm, the whole batch; loss = sum(y * w)."""
    x, w = _batch(dims)
    bn = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    return {
        "y": y.detach(),
        "dx": x.grad,
        "dweight": bn.weight.grad,
        "dbias": bn.bias.grad,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


def _rank_main(rank: int, init: str, dims: int, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    x, w = _batch(dims)
    half = slice(rank * 4, rank * 4 + 4)
    plain = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(3)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        plain.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    bn = convert_sync_batchnorm(nn.Sequential(plain))[0]
    xr = x[half].clone().requires_grad_(True)
    y = bn(xr)
    (y * w[half]).sum().backward()
    grads = torch.stack([bn.weight.grad, bn.bias.grad])
    torch_dist.all_reduce(grads)  # the ranks' loss terms add up to the reference's loss
    result = {
        "y": y.detach(),
        "dx": xr.grad,
        "dweight": grads[0],
        "dbias": grads[1],
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
        "type": type(bn).__name__,
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("dims", [4, 2])
def test_two_ranks_equal_one_process_over_the_whole_batch(tmp_path, dims):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_main, args=(init, dims, str(tmp_path)), nprocs=WORLD, join=True)
    ref = _reference(dims)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["type"] == "GroupSyncBatchNorm"
        half = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(got["y"], ref["y"][half], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["dx"], ref["dx"][half], rtol=1e-5, atol=1e-5)
        for key in ("dweight", "dbias", "running_mean", "running_var"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=key)


def test_conversion_keeps_tensors_keys_and_copies():
    """Same Parameter and buffer objects (the optimizer, flatten_parameters_ and checkpoints see the same
    tensors), same state_dict keys; deepcopy works (teacher_init=copy); without a process group it is
    plain BatchNorm."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=4, small_input=True, in_channels=1)
    before = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    plain = copy.deepcopy(model).train()
    converted = convert_sync_batchnorm(model, 0)
    assert all(p is before[name] for name, p in converted.named_parameters())
    assert list(converted.state_dict()) == keys
    assert any(isinstance(m, GroupSyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    flatten_parameters_(converted)
    assert flat_view([p.detach() for p in converted.parameters()]) is not None
    twin = copy.deepcopy(converted)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref, got, again = plain(x)[0], converted.train()(x)[0], twin.train()(x)[0]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(again, ref)
    assert sync_bn.sync_group(0) is None  # no process group here: nothing to synchronize
