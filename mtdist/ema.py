"""The teacher: an fp32 exponential moving average of the student, updated in place.

One fused update per optimizer step, at the gradient-accumulation boundary only: the teacher's
parameters are views into one flat fp32 buffer, and when the student's are too (see
flatten_parameters_) the update is a single lerp_ over that buffer, at memory-copy speed;
otherwise one torch._foreach_lerp_ over all tensors (as timm's ModelEmaV3). On CPU the
foreach path is ~5x slower than one flat lerp_ (benchmarks/ema.py). The decay is a separate pure
function (mtdist.schedules.ema_decay). The forward runs in the run's mixed precision while
the weights stay fp32: with decay 0.9997 an update is ~3e-4 of the difference, below bf16's
resolution, so a low-precision EMA would stall.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from mtdist.schedules import ema_decay


class Teacher:
    def __init__(
        self,
        module: nn.Module,
        *,
        decay: float,
        autocast_dtype: torch.dtype | None,
        bn_policy: str = "own",
        batch_scale: float = 1.0,
    ) -> None:
        """`decay`: the cap of this run (already scaled to its batch); `batch_scale`: k = the run's batch /
        the reference batch, which the warm start's step count is measured in (schedules.ema_decay)."""
        self.module = module.float()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._flat = flatten_parameters_(self.module)
        self.decay = decay
        self.batch_scale = batch_scale
        self.autocast_dtype = autocast_dtype
        self.bn_policy = bn_policy
        self.updates = 0  # optimizer steps averaged in so far
        self._params = [p for p in self.module.parameters()]
        self._student: _StudentParams | None = None  # the student's parameters, found on the first update

    @classmethod
    def from_student(cls, student: nn.Module, init: str, build: Callable[[], nn.Module], **kw) -> Teacher:
        """init='copy': start from the student's weights; 'independent': a fresh init (authors' code)."""
        module = copy.deepcopy(student) if init == "copy" else build()
        return cls(module, **kw)

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """teacher <- a * teacher + (1 - a) * student for all parameters in one fused call."""
        if self._params[0].data_ptr() != self._flat.data_ptr():
            raise RuntimeError(
                "teacher: its parameters no longer view its flat fp32 buffer (the module was moved or "
                "converted after Teacher() was built, e.g. .to(device) or .to(memory_format=...)); put the "
                "module on its device and memory format first, then build the Teacher"
            )
        self.updates += 1
        a = self.decay_at(self.updates)
        source = self._student_source(student)
        if isinstance(source, torch.Tensor):
            self._flat.lerp_(source, 1.0 - a)
        else:
            torch._foreach_lerp_(self._params, source, 1.0 - a)
        return a

    def decay_at(self, update: int) -> float:
        """The decay of update number `update` (1 = the first)."""
        return ema_decay(update, self.decay, self.batch_scale)

    def _student_source(self, student: nn.Module) -> torch.Tensor | list[torch.Tensor]:
        """The student's parameters as one flat fp32 buffer when they tile one, else as fp32 tensors.

        Walking the module and re-deriving the flat view took ~6 ms a step for ResNet-152 on CPU, a
        fifth of the update itself; so it is done once and redone only when a parameter of `student`
        has moved (a 0.3 ms pointer check). A Parameter object swapped for another at the same address
        would go unnoticed; neither mtdist nor DeepSpeed (ZeRO 0-2) does that.
        """
        if self._student is None or not self._student.still_describes(student):
            self._student = _StudentParams.of(student, self._params)
        source = self._student.flat if self._student.flat is not None else self._student.params
        if isinstance(source, list) and source[0].dtype != torch.float32:  # a half student: average in fp32
            return [p.float() for p in source]
        return source

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No-grad forward in the run's precision; BN mode is whatever the caller set (train by default)."""
        with torch.no_grad(), self._autocast(x.device):
            return self.module(x)

    __call__ = forward

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def train(self, mode: bool = True) -> Teacher:
        self.module.train(mode)
        return self

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """bn_policy='average': make the BN statistics equal on every rank (before eval and checkpoint)."""
        if self.bn_policy != "average" or not torch_dist.is_initialized():
            return
        world = torch_dist.get_world_size()
        for buf in self.module.buffers():
            if buf.is_floating_point():
                torch_dist.all_reduce(buf)
                buf.div_(world)

    def fingerprint(self) -> str:
        """sha256 of the parameters (and the buffers when they are kept equal across ranks)."""
        tensors = list(self.module.parameters())
        if self.bn_policy == "average":
            tensors += list(self.module.buffers())
        digest = hashlib.sha256()
        for t in tensors:
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


@dataclass
class _StudentParams:
    """The student's parameter tensors as last found, with where their data lived then."""

    module: nn.Module
    params: list[nn.Parameter]  # the Parameter objects: their data_ptr() follows a re-pointed .data
    data_ptrs: list[int]
    flat: torch.Tensor | None  # the fp32 buffer they tile, when they do

    @classmethod
    def of(cls, student: nn.Module, teacher_params: list[torch.Tensor]) -> _StudentParams:
        """The flat buffer is used only where every tensor has the teacher's layout: ZeRO 1/2 re-point
        the student into DeepSpeed's own NCHW buffer, and a channels_last teacher's conv weights lie in
        another element order, where one lerp_ of the two buffers would mix unrelated weights."""
        params = list(student.parameters())
        flat = flat_view([p.detach() for p in params])
        same_layout = all(p.stride() == t.stride() for p, t in zip(params, teacher_params, strict=True))
        flat = flat if flat is not None and flat.dtype == torch.float32 and same_layout else None
        return cls(student, params, [p.data_ptr() for p in params], flat)

    def still_describes(self, student: nn.Module) -> bool:
        """Same module, every parameter still at the same address (so the flat view is still right)."""
        return student is self.module and [p.data_ptr() for p in self.params] == self.data_ptrs


def flat_view(params: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D buffer that `params` tile contiguously, in order, or None if they do not."""
    first = params[0]
    storage, start = first.untyped_storage(), first.storage_offset()
    offset = start
    for p in params:
        same = p.untyped_storage().data_ptr() == storage.data_ptr() and p.dtype == first.dtype
        if not (same and p.storage_offset() == offset and _dense(p)):
            return None
        offset += p.numel()
    return first.new_empty(0).set_(storage, start, (offset - start,))


@torch.no_grad()
def flatten_parameters_(module: nn.Module) -> torch.Tensor:
    """Re-point every parameter of `module` to a view of one new contiguous buffer; returns it.

    Values, shapes, dtypes, memory layouts (channels_last stays channels_last) and identities of
    the Parameter objects are unchanged, so optimizers and DeepSpeed see the same module; an EMA
    over the module becomes one elementwise op.
    """
    params = list(module.parameters())
    if len({(p.dtype, p.device) for p in params}) != 1:
        raise ValueError("flatten_parameters_: parameters must share one dtype and device")
    flat = torch.cat([_in_storage_order(p.detach()) for p in params])
    offset = 0
    for p in params:
        p.data = _view_with_layout(flat[offset : offset + p.numel()], p)
        offset += p.numel()
    return flat


def _channels_last(p: torch.Tensor) -> bool:
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)


def _dense(p: torch.Tensor) -> bool:
    """Contiguous or channels_last: the tensor tiles exactly p.numel() consecutive elements."""
    return p.is_contiguous() or _channels_last(p)


def _in_storage_order(p: torch.Tensor) -> torch.Tensor:
    """The elements of `p` as 1-D, in the order its memory layout stores them."""
    return p.permute(0, 2, 3, 1).reshape(-1) if _channels_last(p) else p.reshape(-1)


def _view_with_layout(chunk: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A view of `chunk` shaped and strided like `p`: channels_last conv weights stay NHWC on CUDA."""
    if _channels_last(p):
        n, c, h, w = p.shape
        return chunk.view(n, h, w, c).permute(0, 3, 1, 2)
    return chunk.view_as(p)


def check_synchronized(teacher: Teacher, step: int) -> str:
    """Hash the teacher on every rank and fail loudly if any rank differs; returns the hash."""
    mine = teacher.fingerprint()
    if not torch_dist.is_initialized() or torch_dist.get_world_size() == 1:
        return mine
    hashes: list[str] = [""] * torch_dist.get_world_size()
    torch_dist.all_gather_object(hashes, mine)
    bad = [rank for rank, h in enumerate(hashes) if h != hashes[0]]
    if bad:
        raise RuntimeError(
            f"teacher out of sync at step {step}: ranks {bad} differ from rank 0 "
            f"(hashes {sorted(set(hashes))}); the student must be identical on every rank (ZeRO 0-2, "
            "same seed) - check for rank-dependent parameter updates"
        )
    return mine
