"""ResNet-152 Mean Teacher at 224x224 on one GPU, synthetic data: images/s, MFU, peak memory, MT / supervised.

Both steps are mtdist's own (mtdist.preflight.SyntheticStep: the DeepSpeed engine with bf16 autocast,
fused SGD, channels_last, cudnn.benchmark, the fp32 EMA teacher), timed one after the other in
one run; peak memory is taken per phase. FLOPs are counted on the model itself
(torch.utils.flop_counter, 2 FLOPs per multiply-add: ResNet-152 forward ~23 GFLOP/image at 224,
i.e. the ~11.5 G multiply-adds usually quoted as "GFLOPs"). A Mean Teacher step costs the
student's forward + backward (3x forward) plus the teacher's forward (1x): 4x forward FLOPs per
student image, against 3x for a supervised step, so MT / supervised is at best 0.75 in images/s.

    python -m benchmarks.gpu_step                      # on a GPU machine (make gpu-check: batch 50 and 128)
    python -m benchmarks.gpu_step --device cpu --arch resnet18 --size 64 --batch 8 --steps 3   # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

# dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name(); first match wins
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)
MT_GOAL = 0.72  # issue 6: Mean Teacher images/s at least 0.72 of supervised (0.75 by FLOPs)


def peak_tflops(device_name: str, override: float) -> float | None:
    """The override if given, else the table's entry for this device, else None (MFU not printed)."""
    if override > 0:
        return override
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def forward_flops_per_image(cfg: Any) -> float:
    """FLOPs of one student forward at the configured size, counted on meta tensors (no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mtdist.train import build_student

    with torch.device("meta"):
        model = build_student(cfg)
        x = torch.empty(1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def measure_phase(cfg: Any, device: Any, warmup_steps: int, steps: int) -> dict[str, float]:
    """Build mtdist's step for `cfg`, warm up (cudnn autotuning, compilation), then time `steps`."""
    import torch

    from mtdist.preflight import SyntheticStep

    stepper = SyntheticStep(cfg, device)
    for i in range(warmup_steps):
        stepper(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(warmup_steps, warmup_steps + steps):
        stepper(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's high-water resident memory (KiB on Linux), all phases so far
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del stepper
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"images_per_s": cfg.data.batch_size * steps / seconds, "peak_gib": peak_gib}


def run(
    arch: str = "resnet152",
    size: int = 224,
    batch: int = 128,
    steps: int = 30,
    warmup_steps: int = 10,
    channels_last: bool = True,
    compile_models: bool = False,
    peak_override_tflops: float = 0.0,
    precision: str = "auto",
) -> dict[str, Any]:
    import torch

    from benchmarks.step import bench_config
    from mtdist.preflight import init_single_process

    device = init_single_process()
    # auto: bf16 autocast on a GPU; fp32 on a CPU, where bf16 is emulated and several times slower
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    extra = (
        f"model.channels_last={str(channels_last).lower()}",
        f"model.compile={str(compile_models).lower()}",
    )
    mt_cfg = bench_config(arch, size, batch, bf16=bf16, extra=extra)
    sup_cfg = bench_config(arch, size, batch, bf16=bf16, mean_teacher=False, extra=extra)
    fwd = forward_flops_per_image(mt_cfg)
    mt = measure_phase(mt_cfg, device, warmup_steps, steps)
    sup = measure_phase(sup_cfg, device, warmup_steps, steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, peak_override_tflops)
    mt["tflops"] = mt["images_per_s"] * 4 * fwd / 1e12
    sup["tflops"] = sup["images_per_s"] * 3 * fwd / 1e12
    for phase in (mt, sup):
        phase["mfu"] = phase["tflops"] / peak if peak else float("nan")
    ratio = mt["images_per_s"] / sup["images_per_s"]
    return {
        "setup": (
            f"{arch} at {size}x{size}, batch {batch} per GPU (MT: {batch // 2} labeled), "
            f"{'bf16 autocast' if bf16 else 'fp32'}, "
            f"channels_last={channels_last and device.type == 'cuda'}, compile={compile_models}, "
            f"{warmup_steps} warm-up + {steps} timed steps; {name}, torch {torch.__version__}"
        ),
        "device": name,
        "forward_gflop_per_image": fwd / 1e9,
        "peak_tflops": peak,
        "mean_teacher": mt,
        "supervised": sup,
        "ratios": [
            {
                "name": "MT / supervised (student images/s)",
                "value": ratio,
                "goal": f">= {MT_GOAL} (0.75 by FLOPs)",
                "met": ratio >= MT_GOAL,
            }
        ],
    }


def report_lines(res: dict[str, Any]) -> list[str]:
    peak = res["peak_tflops"]
    lines = [
        f"  {res['setup']}",
        f"  forward {res['forward_gflop_per_image']:.2f} GFLOP/image; peak "
        + (f"{peak:.0f} TFLOP/s dense bf16" if peak else "unknown (pass --peak-tflops for MFU)"),
    ]
    memory = "peak GPU memory" if res["device"] != "cpu" else "process max RSS"
    for name, key, mult in (("Mean Teacher", "mean_teacher", 4), ("supervised", "supervised", 3)):
        r = res[key]
        mfu = f"MFU {r['mfu']:.1%}" if peak else "MFU n/a"
        lines.append(
            f"  {name:<13} {r['images_per_s']:8.1f} student images/s  {r['tflops']:7.2f} TFLOP/s "
            f"({mult}x fwd)  {mfu}  {memory} {r['peak_gib']:.2f} GiB"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--arch", default="resnet152")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="per GPU; the flagship's is 50 (400 over 8 GPUs)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cudnn autotuning, compile)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's peak for MFU")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--json", type=Path, help="also write the figures to this file (benchmarks/gpu_check.py)")
    args = p.parse_args()
    if args.device == "cpu":  # before torch or DeepSpeed look for a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["DS_ACCELERATOR"] = "cpu"
    else:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device visible; use --device cpu (with small settings) for a smoke run")
    res = run(
        args.arch,
        args.size,
        args.batch,
        args.steps,
        min(args.warmup, max(1, args.steps // 3)),  # a smoke run's 3 steps get 1 warm-up step
        not args.no_channels_last,
        args.compile,
        args.peak_tflops,
        args.precision,
    )
    print("\n".join(report_lines(res)))
    for r in res["ratios"]:
        print(f"  {r['name']}: {r['value']:.3f} (goal {r['goal']})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
