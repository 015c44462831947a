"""The `mtdist` command: train, eval, export, plan, report, demo. Config: YAML plus dotted key=value
overrides."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import yaml

from mtdist.config import Config, ConfigError, load_config, to_dict
from mtdist.preempt import REQUEUE_EXIT_CODE, Preempted


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtdist", description="Mean Teacher on DeepSpeed")
    # the deepspeed launcher passes --local_rank=N; we read LOCAL_RANK from the environment instead
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a config file")
    train.add_argument(
        "--config", required=True, help="YAML file, e.g. configs/imagenet_resnet152_10pct.yaml"
    )
    train.add_argument("--dry-run", action="store_true", help="print the resolved and derived config, exit")
    train.add_argument(
        "--world-size",
        type=int,
        default=0,
        help="dry-run only: ranks to plan for (default cluster.nodes x cluster.gpus_per_node)",
    )
    train.add_argument("overrides", nargs="*", metavar="key=value")

    ev = sub.add_parser("eval", help="evaluate the student and the teacher of a checkpoint")
    ev.add_argument(
        "--checkpoint", required=True, help="a checkpoint folder, e.g. runs/x/checkpoints/step-00001000"
    )
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.val=other.index.json")
    _add_plan_parser(sub)
    _add_report_parser(sub)
    export = sub.add_parser("export", help="a checkpoint's teacher or student as a .safetensors file")
    from mtdist.export import add_arguments as add_export_arguments

    add_export_arguments(export)
    shards = sub.add_parser("make-shards", help="ImageNet folders (ILSVRC-2012 layout) -> WebDataset shards")
    from mtdist.data.make_shards import add_arguments as add_make_shards_arguments

    add_make_shards_arguments(shards)
    index = sub.add_parser("index-shards", help="byte-offset tables for older shards")
    index.add_argument("spec", help="a shard spec: *.index.json, brace pattern, glob or comma list")
    _add_recover_parser(sub)
    submit = sub.add_parser("submit", help="train on Slurm via submitit (see mtdist submit --help)")
    submit.add_argument("args", nargs=argparse.REMAINDER, help="--config FILE [key=value ...] [--dry-run]")
    demo = sub.add_parser("demo", help="supervised-only vs Mean Teacher on MNIST-5k, 10%% labels")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. seeds=[0] steps=2000")
    return p


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from mtdist.preflight import DEFAULT_DECODE_PER_CORE, DEFAULT_SAMPLE_BYTES

    plan = sub.add_parser("plan", help="preflight: time, GPU-hours, read rate and decode cores of a run")
    plan.add_argument("--config", required=True, help="YAML file, e.g. configs/imagenet_resnet152_10pct.yaml")
    speed = plan.add_mutually_exclusive_group(required=True)
    speed.add_argument("--images-per-s", type=float, help="student images/s per GPU (e.g. from gpu_step.py)")
    speed.add_argument(
        "--measure-steps", type=int, help="measure it: this many synthetic steps of one rank on this machine"
    )
    plan.add_argument("--world-size", type=int, default=0, help="GPUs (default: nodes x gpus_per_node)")
    decode = plan.add_mutually_exclusive_group()
    decode.add_argument(
        "--decode-per-core",
        type=float,
        help=f"two-view images/s one CPU core decodes (default {DEFAULT_DECODE_PER_CORE:.0f}, measured by "
        "benchmarks/data.py on the development VM: an assumption for other machines)",
    )
    decode.add_argument(
        "--measure-decode",
        type=int,
        metavar="N",
        help="measure it: decode N samples of the run's own shards here, as a loader worker does",
    )
    plan.add_argument(
        "--sample-bytes",
        type=float,
        default=DEFAULT_SAMPLE_BYTES,
        help=f"bytes per sample where the shard index cannot tell (default {DEFAULT_SAMPLE_BYTES:,})",
    )
    plan.add_argument("overrides", nargs="*", metavar="key=value")


def _add_recover_parser(sub: argparse._SubParsersAction) -> None:
    about = "after a failed run (slurm/train.sbatch): exit 0 if it should be requeued, 1 if not (see why)"
    recover = sub.add_parser("recover", help=about)
    recover.add_argument("--config", required=True, help="the failed run's config file")
    recover.add_argument("--world-size", type=int, required=True, help="the failed run's ranks")
    recover.add_argument("--exit-status", type=int, required=True, help="the failed run's exit status")
    recover.add_argument("overrides", nargs="*", metavar="key=value")


def recover_command(args: argparse.Namespace) -> int:
    """The restart decision for this attempt (MTDIST_ATTEMPT) of the configured run, printed in one line."""
    from pathlib import Path

    from mtdist import failures

    cfg = load_config(args.config, args.overrides)
    run_dir, attempt = Path(cfg.logging.run_dir), failures.attempt_id()
    decision, _ = failures.settle(
        run_dir, attempt, args.world_size, cfg.cluster.max_failures, 0.0, args.exit_status
    )
    print(f"mtdist: run failed: {decision.cause}; {decision.action}", flush=True)
    return 0 if decision.requeue else 1


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser("report", help="PNG plots of a run's metrics into RUN_DIR/report/")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder holding metrics.jsonl")


def plan_command(args: argparse.Namespace) -> str:
    from mtdist import preflight

    cfg = load_config(args.config, args.overrides)
    if args.measure_steps is not None:
        speed, source = preflight.measure_images_per_s(cfg, args.world_size, args.measure_steps)
    else:
        speed, source = args.images_per_s, "given"
    decode, decode_source = decode_rate(args, cfg)
    est = preflight.estimate(cfg, speed, args.world_size, decode, args.sample_bytes, decode_source)
    return preflight.report(est, source)


def decode_rate(args: argparse.Namespace, cfg: Config) -> tuple[float, str]:
    """Two-view images/s per core for the decode estimate, and where the figure came from."""
    from mtdist import preflight

    if args.measure_decode is not None:
        return preflight.measure_decode_per_core(cfg, args.measure_decode)
    if args.decode_per_core is not None:
        return args.decode_per_core, "given: --decode-per-core"
    return preflight.DEFAULT_DECODE_PER_CORE, preflight.DEFAULT_DECODE_SOURCE


def export_summary(out: str, info: dict) -> str:
    from mtdist.models.io import info_path

    m, src = info["model"], info["source"]
    return (
        f"wrote {out} ({info['tensors']} tensors, {info['parameters']:,} parameters, {info['dtype']}, "
        f"{info['key_names']} key names) and {info_path(out)}: the {info['which']} of {m['arch']} at step "
        f"{src['step']}; load it with mtdist.models.load_exported({str(out)!r})\n"
        f"BN statistics: {info['bn_statistics']}"
    )


def dry_run(cfg: Config, world_size: int) -> str:
    """The resolved config, the derived plan, the recipe scaled to the run's batch (each value with the rule
    that gave it) and the DeepSpeed JSON, as one YAML document."""
    from mtdist.plan import dataset_sizes, make_plan, scaling_report

    world = world_size or cfg.cluster.nodes * (cfg.cluster.tasks_per_node or cfg.cluster.gpus_per_node)
    plan = make_plan(cfg, world, *dataset_sizes(cfg))
    derived = {k: v for k, v in vars(plan).items() if k not in ("deepspeed_config", "scaling")}
    derived["unlabeled_batch_size"] = plan.batch_size - plan.labeled_batch_size
    doc = {
        "config": to_dict(cfg),
        "derived": derived,
        "scaling": scaling_report(cfg, plan),
        "deepspeed_config": plan.deepspeed_config,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")


def run(argv: list[str]) -> int:
    if argv[:1] == ["submit"]:  # its own parser: the launch layer (launch/, installed as mtdist.launch)
        from mtdist.launch.submit import main as submit_main

        return submit_main(argv[1:])
    args = _parser().parse_args(argv)
    _setup_logging()
    if args.command == "demo":
        from mtdist.demo import run_demo

        run_demo(args.overrides)
        return 0
    if args.command == "make-shards":
        from mtdist.data.make_shards import run_from_args

        return run_from_args(args)
    if args.command == "index-shards":
        from mtdist.data import resolve_shards
        from mtdist.data.seek import index_shards

        lines = index_shards(resolve_shards(args.spec))
        print("\n".join(lines) if lines else "every shard already has a current byte-offset table")
        return 0
    if args.command == "plan":
        try:
            print(plan_command(args))
        except FileNotFoundError as err:  # a shard index named by the config is not there
            print(f"mtdist plan: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "report":
        from mtdist.report import write_report

        try:
            print("\n".join(write_report(args.run_dir)))
        except (FileNotFoundError, ValueError) as err:
            print(f"mtdist report: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "export":
        from mtdist.export import run_from_args

        try:
            info = run_from_args(args)
        except (FileNotFoundError, ValueError) as err:
            print(f"mtdist export: {err}", file=sys.stderr)
            return 2
        print(export_summary(args.out, info))
        return 0
    if args.command == "recover":
        return recover_command(args)
    if args.command == "eval":
        from pathlib import Path

        from mtdist.train import evaluate_checkpoint

        print(json.dumps(evaluate_checkpoint(Path(args.checkpoint), args.overrides), indent=2))
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(cfg, args.world_size))
        return 0
    from mtdist.train import main as train_main

    train_main(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"mtdist: config error: {err}", file=sys.stderr)
        return 2
    except Preempted as err:
        print(f"mtdist: {err}; exit {REQUEUE_EXIT_CODE} = requeue me", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except Exception as err:
        from mtdist import failures

        if failures.classify(err) != "fatal":
            raise  # the traceback; the launch layer may restart the run
        print(f"mtdist: {failures.one_line(err)} (a restart would fail the same way)", file=sys.stderr)
        return failures.FATAL_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
