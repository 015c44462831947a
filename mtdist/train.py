"""main(cfg): wire the components, then a short loop of Mean Teacher steps.

The same code runs as one process, under torchrun or the deepspeed launcher, under srun or
submitit: it reads only the torch.distributed environment contract (mtdist.dist).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm import tqdm

from mtdist import checkpoint, failures
from mtdist.checkpoint import TrainState
from mtdist.config import Config, load_config_dict, save_config, to_dict
from mtdist.data import EvalBatches
from mtdist.dist import DistEnv, dist_env_from_environ, init_process_group, nhwc_inputs, sum_over_ranks
from mtdist.ema import Teacher, check_synchronized, flatten_parameters_
from mtdist.engine import build_engine, init_distributed, load_checkpoint
from mtdist.evaluate import evaluate
from mtdist.inputs import build_train_batches, check_eval_shards, check_shards_exist, eval_batches
from mtdist.logger import MetricsLogger, new_run_id
from mtdist.models import build_model
from mtdist.plan import Plan, dataset_sizes, make_plan
from mtdist.preempt import Preempted, StopSignal
from mtdist.schedules import consistency_weight
from mtdist.step import LossWeights, train_step
from mtdist.sync_bn import convert_sync_batchnorm
from mtdist.watchdog import HANG_EXIT_CODE, Watchdog

log = logging.getLogger("mtdist")
TEST_KEYS_ENV = "MTDIST_TEST_KEYS_DIR"  # tests only: see record_test_keys


@dataclass
class Run:
    """Everything the loop touches, built once by build_run()."""

    cfg: Config
    env: DistEnv
    device: torch.device
    plan: Plan
    engine: Any
    teacher: Teacher | None
    train_batches: Iterator
    run_dir: Path
    metrics: MetricsLogger
    state: TrainState
    watchdog: Watchdog
    # One eval loader per split, built at its first evaluation and reused (persistent workers): no
    # worker start per evaluation (see mtdist.data.loader.worker_context for why that matters).
    eval_loaders: dict[str, EvalBatches] = field(default_factory=dict)

    def eval_batches(self, spec: str) -> EvalBatches:
        if spec not in self.eval_loaders:
            self.eval_loaders[spec] = eval_batches(self.cfg, self.env, spec, self.watchdog.beat)
        return self.eval_loaders[spec]

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.cfg)


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    if cfg.deepspeed.bf16:
        return torch.bfloat16
    return torch.float16 if cfg.deepspeed.fp16 else None


def build_student(cfg: Config) -> nn.Module:
    m, d = cfg.model, cfg.data
    return build_model(
        m.arch,
        d.num_classes,
        two_heads=m.two_heads,
        small_input=m.small_input,
        in_channels=d.channels,
        dropout=m.dropout,
        input_size=d.image_size,
        width=m.width,
    )


def build_teacher(cfg: Config, student: nn.Module, device: torch.device, plan: Plan) -> Teacher:
    """The EMA teacher at the plan's decay (ema_decay scaled to this run's batch, see plan.batch_scaling)."""
    mt, scaling = cfg.mean_teacher, plan.scaling

    def fresh() -> nn.Module:
        torch.manual_seed(cfg.seed + 1)  # the same independent init on every rank
        return build_student(cfg)

    return Teacher.from_student(
        student,  # already placed: a copy keeps its device and memory layout
        mt.teacher_init,
        lambda: place_model(fresh(), cfg, device),
        decay=scaling.ema_decay if scaling is not None else mt.ema_decay,
        autocast_dtype=autocast_dtype(cfg),
        bn_policy=mt.teacher_bn,
        batch_scale=scaling.k if scaling is not None else 1.0,
    )


def place_model(module: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """On `device`; the weights stay NCHW even with model.channels_last, which makes the input batches
    (so every activation) NHWC (to_device): DeepSpeed's engine broadcasts each parameter viewed as bytes
    at its start, which an NHWC conv weight cannot be (its last stride is not 1), and ZeRO 1/2 re-point
    the weights into NCHW buffers anyway. cuDNN takes an NHWC input with an NCHW weight by copying the
    weight to NHWC per convolution: small next to the activations.

    Must run before flatten_parameters_ or Teacher(): both keep the parameters as views of one
    buffer, and a later .to() would replace the views with fresh tensors the EMA never touches.
    model.sync_bn swaps the BN layers here too (same Parameter objects), so student and teacher both
    take their train-mode BN statistics over the group (README: "BatchNorm at small per-GPU batches").
    """
    module = module.to(device)
    if cfg.model.sync_bn:
        module = convert_sync_batchnorm(module, cfg.model.sync_bn_group_size)
    return module


def build_models(cfg: Config, plan: Plan, device: torch.device) -> tuple[Any, Teacher | None]:
    """The student inside its DeepSpeed engine and the EMA teacher (None if supervised-only)."""
    torch.manual_seed(cfg.seed)  # identical student init on every rank
    student = place_model(build_student(cfg), cfg, device)
    flatten_parameters_(student)  # the teacher update becomes one lerp_ over a flat buffer
    teacher = build_teacher(cfg, student, device, plan) if cfg.mean_teacher.enabled else None
    engine = build_engine(cfg, student, plan)
    if cfg.model.compile:
        compile_models(engine.module, teacher)
    return engine, teacher


def compile_models(student: nn.Module, teacher: Teacher | None) -> None:
    """torch.compile in place (nn.Module.compile): state_dict keys, checkpoints and the flat buffers
    stay as they are; the first step pays the compilation."""
    student.compile()
    if teacher is not None:
        teacher.module.compile()


def set_backend_flags(device: torch.device) -> None:
    """cuDNN autotuning: the input shape is fixed for a whole run, so the search pays for itself."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def set_cpu_threads(device: torch.device) -> None:
    """Ranks sharing one CPU must not each start a thread per core (they would oversubscribe it)."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def build_run(cfg: Config, exact_resume: bool = True, watchdog: Watchdog | None = None) -> Run:
    """Process group, models, resumed state, logger and train batches; `watchdog` hears each phase."""
    check_shards_exist(cfg)  # missing data is said before the process group, DeepSpeed and the models start
    env = dist_env_from_environ()
    watchdog = watchdog or Watchdog(0, Path(cfg.logging.run_dir), env.rank)
    watchdog.beat("start-up: process group rendezvous")
    device = init_process_group(env, cfg.deepspeed.backend, cfg.dist.collective_timeout_s)
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    set_cpu_threads(device)
    set_backend_flags(device)
    run_dir = Path(cfg.logging.run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    plan = make_plan(cfg, env.world_size, *dataset_sizes(cfg))
    watchdog.beat("start-up: building the models and the DeepSpeed engine")
    engine, teacher = build_models(cfg, plan, device)
    torch.manual_seed(cfg.seed * 1_000_003 + env.rank)  # dropout differs per rank, as its data does
    watchdog.beat("start-up: loading the checkpoint")
    state, data_position = resume(cfg, env, engine, teacher, run_dir / "checkpoints", exact_resume)
    watchdog.beat("start-up: logger and loaders", state.step)
    metrics = MetricsLogger(run_dir, env.is_main)
    metrics.start_wandb(
        cfg.logging.wandb, cfg.logging.wandb_project, state.wandb_run_id, to_dict(cfg), run_dir
    )
    torch_dist.barrier()
    check_eval_shards(cfg, env)
    start, skipped = state.step * cfg.deepspeed.grad_accum_steps, data_position.get("skipped")
    moved = bool(data_position.get("moved"))  # inherited corrupt-sample totals: each reader's bound restarts
    batches = build_train_batches(cfg, env, plan, start, skipped, watchdog.beat, moved)
    return Run(cfg, env, device, plan, engine, teacher, batches, run_dir, metrics, state, watchdog)


def resume(
    cfg: Config, env: DistEnv, engine: Any, teacher: Teacher | None, root: Path, exact: bool = True
) -> tuple[TrainState, dict]:
    """Load the checkpoint that checkpoint.resume selects, or start fresh with a new W&B run id.

    Returns the train state and this rank's data position (TrainBatches.state_dict; {} when fresh).
    exact=False (evaluation only) allows another world size and loader layout, and ignores the position.
    """
    folder = checkpoint.find_resume(cfg, root)
    if folder is None:
        return TrainState(step=0, wandb_run_id=new_run_id()), {}
    meta = checkpoint.read_meta(folder)
    current = checkpoint.movable_signature(cfg, env.world_size)
    if not exact:
        skip = (*checkpoint.MOVABLE, "global_batch_size", "global_labeled_batch_size")  # evaluation only
        current = {k: v for k, v in current.items() if k not in skip}
    checkpoint.check_compatible(meta["signature"], current, folder)
    # data.order=global: another allocation continues the same global steps (checkpoint.moved_position)
    moved = checkpoint.allocation_change(meta, env.world_size, cfg.data.num_workers) if exact else ""
    saved_world = checkpoint.saved_world_size(meta, env.world_size)
    if moved:
        log.info("resuming %s on another allocation: %s; global batch and schedule unchanged", folder, moved)
    load_checkpoint(engine, str(folder.parent), folder.name, saved_world, optimizer=exact)
    source = checkpoint.source_rank(env.rank, saved_world)
    rank_state = checkpoint.load_rank_state(folder, source)
    if teacher is not None:
        teacher.load_state_dict(rank_state["teacher"])
    # DeepSpeed restored rank 0's module on every rank; BN statistics are per rank
    engine.module.load_state_dict(rank_state["student_buffers"], strict=False)
    state = TrainState()
    state.load_state_dict(meta["train_state"])
    if source == env.rank:
        checkpoint.set_rng_state(rank_state["rng"])
    else:  # a rank the saved run lacked: rank `source`'s generators would repeat its dropout masks
        checkpoint.seed_rng(checkpoint.new_rank_seed(cfg.seed, env.rank, state.step))
    log.info("resumed from %s at step %d", folder, state.step)
    if moved:
        return state, checkpoint.moved_position(meta, env.rank, env.world_size)
    return state, rank_state.get("data", {}) if exact else {}


def save_checkpoint(run: Run) -> Path:
    """All ranks: DeepSpeed state + per-rank teacher, BN buffers and RNG; atomic (see checkpoint.py)."""
    run.watchdog.beat("checkpoint save (gather and write)")
    if run.teacher is not None:
        run.teacher.sync_buffers()
    rank_state = {
        "teacher": run.teacher.state_dict() if run.teacher is not None else {},
        "student_buffers": dict(run.engine.module.named_buffers()),
        "rng": checkpoint.rng_state(),
        "data": run.train_batches.state_dict(run.state.step * run.cfg.deepspeed.grad_accum_steps),
    }
    # every rank's position in meta.json: a resume on another number of ranks re-divides them
    positions = [None] * run.env.world_size if torch_dist.is_initialized() else [rank_state["data"]]
    if torch_dist.is_initialized():
        torch_dist.all_gather_object(positions, rank_state["data"])
    meta = checkpoint.make_meta(run.cfg, run.state, run.env.world_size, positions)
    folder = checkpoint.save(
        run.checkpoint_root, run.engine, rank_state, meta, run.state.step, run.cfg.checkpoint.keep_last
    )
    run.watchdog.beat("training, after a checkpoint save")
    return folder


def to_device(batch: tuple[torch.Tensor, ...], run: Run) -> tuple[torch.Tensor, ...]:
    out = [t.to(run.device, non_blocking=True) for t in batch]
    if nhwc_inputs(run.cfg.model.channels_last, run.device):
        out[0], out[1] = (t.contiguous(memory_format=torch.channels_last) for t in out[:2])
    return tuple(out)


def loss_weights(cfg: Config, epoch: float) -> LossWeights:
    mt = cfg.mean_teacher
    return LossWeights(
        consistency_kind=mt.consistency,
        consistency_weight=consistency_weight(
            epoch, weight=mt.consistency_weight, rampup_epochs=mt.consistency_rampup_epochs
        ),
        logit_distance_cost=mt.logit_distance_cost,
    )


class Window:
    """Loss terms summed since the last log line; reduced across ranks once per log interval. Also the
    host seconds spent waiting for the next batch (`next_batch`), for data/wait_fraction."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = time.perf_counter()
        self.waited_s = 0.0

    def next_batch(self, batches: Iterator) -> Any:
        """next(batches), timed on the host clock: no device sync is added (a step already waits for
        its device in the loss check, and that wait is step time, not input time)."""
        start = time.perf_counter()
        batch = next(batches)
        self.waited_s += time.perf_counter() - start
        return batch

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.float()
        self.count += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] for k in keys]).to(device) / self.count
        if torch_dist.is_initialized():
            torch_dist.all_reduce(values)
            values /= torch_dist.get_world_size()
        return dict(zip(keys, values.tolist(), strict=True))


def evaluate_both(run: Run, spec: str, step: int, prefix: str) -> dict[str, float]:
    """Student and teacher on the same split; the teacher's rank-sync is checked first."""
    out: dict[str, float] = {}
    cl = nhwc_inputs(run.cfg.model.channels_last, run.device)
    models = {"student": run.engine.module}
    if run.teacher is not None:
        run.watchdog.beat(f"{prefix}: teacher sync check (all_gather of hashes)")
        run.teacher.sync_buffers()
        check_synchronized(run.teacher, step)
        models["teacher"] = run.teacher.module
    batches = run.eval_batches(spec)
    beating = run.watchdog.beating(batches, f"{prefix}: evaluation batches and the all_reduce of counts")
    for name, res in evaluate(models, beating, run.device, run.autocast_dtype, cl).items():
        out |= {f"{prefix}/{name}/top1": res["top1"], f"{prefix}/{name}/top5": res["top5"]}
        out[f"{prefix}/count"] = res["count"]
    # corrupt samples dropped in the pass, summed over ranks
    errors = sum_over_ranks(torch.tensor([batches.errors], dtype=torch.float64), run.device)
    out[f"{prefix}/data_errors"] = errors.item()
    return out


def log_step(run: Run, step: int, window: Window, bar: tqdm) -> None:
    cfg, plan = run.cfg, run.plan
    elapsed = time.perf_counter() - window.start
    images_per_s = plan.batch_size * window.count / cfg.deepspeed.grad_accum_steps / elapsed
    row = window.reduce(run.device) | {
        "train/lr": run.engine.get_lr()[0],
        "train/epoch": plan.epoch(step),
        "train/consistency_weight": loss_weights(cfg, plan.epoch(step - 1)).consistency_weight,
        "data/images_per_s": images_per_s,
        **wait_metrics(window.waited_s / elapsed, run.device),
        **data_error_metrics(run, step),
        "system/world_size": run.env.world_size,
        **system_metrics(run.device, elapsed * cfg.deepspeed.grad_accum_steps / window.count),
    }
    if run.teacher is None:
        del row["train/consistency_weight"]
    else:
        row["train/ema_decay"] = run.teacher.decay_at(max(run.teacher.updates, 1))  # the plan's, scaled
        row["train/teacher_updates"] = run.teacher.updates
    run.metrics.log(step, row)
    wait = f"{row['data/wait_fraction']:.0%}/{row['data/wait_fraction_worst']:.0%}"  # mean / worst rank
    bar.set_postfix(loss=f"{row['train/loss_total']:.3f}", img_s=f"{images_per_s:.0f}", data_wait=wait)


def wait_metrics(fraction: float, device: torch.device) -> dict[str, float]:
    """The share of the log interval each rank spent waiting for its next batch: the mean over ranks,
    the worst rank's and which rank that is (an input-bound run shows in the mean, a straggler or a
    slow node in the worst). One all_gather of one number per rank, at log intervals only."""
    values = [fraction]
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        mine = torch.tensor([fraction], dtype=torch.float64, device=device)  # nccl needs a device tensor
        gathered = [torch.empty_like(mine) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(gathered, mine)
        values = torch.cat(gathered).tolist()
    worst = max(range(len(values)), key=values.__getitem__)
    return {
        "data/wait_fraction": sum(values) / len(values),
        "data/wait_fraction_worst": values[worst],
        "data/wait_worst_rank": worst,
    }


def system_metrics(device: torch.device, step_time_s: float) -> dict[str, float]:
    """This rank's (rank 0 logs them): wall seconds per optimizer step since the last log line, resident
    memory, and on CUDA the peak memory allocated by tensors."""
    row = {"system/step_time_s": step_time_s, "system/rss_gb": resident_bytes() / 2**30}
    if device.type == "cuda":
        row["system/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def resident_bytes() -> int:
    """The process's resident set size now (Linux /proc); elsewhere its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def data_error_metrics(run: Run, step: int) -> dict[str, float]:
    """Corrupt samples dropped, summed over ranks: in this log interval, since the run's start, and as a
    fraction of all raw samples read for the batches consumed (the bound itself is per reader)."""
    counts = run.train_batches.report(step * run.cfg.deepspeed.grad_accum_steps)
    values = torch.tensor([counts.errors, counts.errors_total, counts.samples_total], dtype=torch.float64)
    errors, total, samples = sum_over_ranks(values, run.device).tolist()
    return {"data/errors": errors, "data/errors_total": total, "data/error_fraction": total / max(samples, 1)}


def eval_due(cfg: Config, plan: Plan, step: int) -> bool:
    interval = cfg.logging.eval_interval_steps or plan.steps_per_epoch
    return bool(cfg.data.val) and (step % interval == 0 or step == plan.total_steps)


def train_loop(run: Run, stop: StopSignal | None = None) -> None:
    """Steps from run.state.step to plan.total_steps; checkpoints at intervals and on a stop signal."""
    cfg, plan = run.cfg, run.plan
    if run.teacher is not None:
        run.teacher.train()  # the paper runs the teacher in train mode: its own BN batch statistics
    bar = tqdm(
        total=plan.total_steps,
        initial=run.state.step,
        unit="step",
        dynamic_ncols=True,
        disable=not (run.env.is_main and cfg.logging.progress_bar),
    )
    window = Window()
    for step in range(run.state.step, plan.total_steps):
        run.watchdog.beat("train step (next batch, forward, backward, gradient all_reduce)", step)
        inject_test_fault(run.run_dir, run.env.rank, step, stop)
        weights = loss_weights(cfg, plan.epoch(step))
        for _ in range(cfg.deepspeed.grad_accum_steps):
            batch = window.next_batch(run.train_batches)
            record_test_keys(run, step)
            terms, _ = train_step(run.engine, run.teacher, to_device(batch, run), weights, step)
            window.add(terms)
        run.state.step = done = step + 1
        bar.update(1)
        if done % cfg.logging.log_interval_steps == 0 or done == plan.total_steps:
            run.watchdog.beat("logging (all_reduce of metrics)", done)
            log_step(run, done, window, bar)
            window = Window()
        new_best = False
        if eval_due(cfg, plan, done):
            scores = evaluate_both(run, cfg.data.val, done, "eval")
            run.metrics.log(done, scores)
            new_best = cfg.checkpoint.keep_best and run.state.note_eval(best_top1(scores), done)
        run.watchdog.beat("stop-signal check (all_reduce)", done)
        if stop is not None and stop.requested(run.device):
            save_checkpoint(run)
            failures.mark_ended(run.run_dir)  # the batch script must not read this end as a failure
            bar.close()
            stop.hand_over()  # raises Preempted (or submitit requeues and exits)
        if new_best or (cfg.checkpoint.interval_steps and done % cfg.checkpoint.interval_steps == 0):
            save_checkpoint(run)  # a new best is saved now, whatever the interval (checkpoint.keep_best)
    bar.close()


def best_top1(scores: dict[str, float]) -> float:
    """What checkpoint.keep_best ranks by: the teacher's top-1 (the student's when there is no teacher).
    Reduced across ranks, so every rank takes the same decision and saves together."""
    return scores.get("eval/teacher/top1", scores["eval/student/top1"])


def final_results(run: Run) -> dict[str, float]:
    """Val and test of student and teacher after the last step; written to final.json on rank 0."""
    out: dict[str, float] = {"step": run.plan.total_steps}
    for split in ("val", "test"):
        spec = getattr(run.cfg.data, split)
        if spec:
            out |= evaluate_both(run, spec, run.plan.total_steps, split)
    if run.env.is_main:
        (run.run_dir / "final.json").write_text(json.dumps(out, indent=2))
        run.metrics.log(run.plan.total_steps, out)
    return out


def main(cfg: Config, on_hang: Callable[[Watchdog], None] | None = None) -> dict[str, float]:
    """Train as configured (resuming when checkpoint.resume finds a checkpoint); the final metrics.

    A stop signal (checkpoint.signals) ends it early with a checkpoint and raises Preempted. A failure
    is recorded for the launch layer (mtdist.failures) and raised; a hang is recorded, then `on_hang`
    runs (in the watchdog thread) and the process exits with HANG_EXIT_CODE (mtdist.watchdog).
    """
    env = dist_env_from_environ()

    def hung(w: Watchdog) -> None:
        error = f"no progress for {w.timeout_s:g} s, exit {HANG_EXIT_CODE}; stacks in {w.stack_file}"
        # Waiting in a collective, this rank most likely waits for a peer stuck elsewhere: recorded as a
        # lost peer, so the decision waits for (and names first) the peer's own hang record.
        collective = w.in_collective()
        kind, error = ("collective", f"waiting in a collective, {error}") if collective else ("hang", error)
        record_failure(cfg, env, w, kind, error)
        if on_hang is not None:
            on_hang(w)

    watchdog = Watchdog(cfg.dist.hang_timeout_s, Path(cfg.logging.run_dir), env.rank, on_hang=hung)
    stop = StopSignal(cfg.checkpoint.signals)
    try:
        run = build_run(cfg, watchdog=watchdog.start())
        log.info(
            "training steps %d..%d (%d per epoch) on %d rank(s), %d images per step",
            run.state.step,
            run.plan.total_steps,
            run.plan.steps_per_epoch,
            run.env.world_size,
            run.plan.batch_size,
        )
        train_loop(run, stop)
        if run.state.step not in _saved_steps(run):
            save_checkpoint(run)
        results = final_results(run)
        failures.mark_ended(run.run_dir)  # a kill from here on (srun --wait, in teardown) is no failure
        watchdog.stop()  # done: closing W&B may take its time
        run.metrics.close()
    except Preempted:
        raise
    except Exception as exc:
        record_failure(cfg, env, watchdog, failures.classify(exc), failures.one_line(exc))
        exc.add_note(f"mtdist: rank {env.rank} failed at step {watchdog.step}, in {watchdog.what}")
        raise
    finally:
        watchdog.stop()
        stop.restore()
    return results


def record_failure(cfg: Config, env: DistEnv, watchdog: Watchdog, kind: str, error: str) -> None:
    """This rank's failure record (mtdist.failures), for the launch layer's restart decision."""
    attempt = failures.attempt_id()
    record = failures.FailureRecord(
        env.rank, env.world_size, attempt, watchdog.step, watchdog.what, kind, error
    )
    path = failures.write_record(Path(cfg.logging.run_dir), record)
    log.error("rank %d failed: %s (recorded in %s)", env.rank, record.describe(), path)


def inject_test_fault(run_dir: Path, rank: int, step: int, stop: StopSignal | None = None) -> None:
    """failures.TEST_FAULT_ENV, for the failure and signal tests only: kill, raise or hang on one rank at
    a step, or hold the step until a stop signal has arrived (a run of fast steps cannot end first)."""
    fault = failures.test_fault(run_dir, rank, step)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "raise":
        raise RuntimeError(f"test fault: rank {rank} raises at step {step}")
    elif fault == "hang":
        _hang_for_the_test()
    elif fault == "await_signal":
        deadline = time.monotonic() + 120.0  # then go on: the test fails on its assertions, not a hang
        while stop is not None and not stop.received and time.monotonic() < deadline:
            time.sleep(0.05)


def record_test_keys(run: Run, step: int) -> None:
    """TEST_KEYS_ENV, for the data-order tests only: each rank appends the keys of every batch it trains
    on, with the step, to <dir>/keys-rank<r>.jsonl (the order's guarantees, checked through mtdist train)."""
    folder = os.environ.get(TEST_KEYS_ENV)
    if folder:
        with (Path(folder) / f"keys-rank{run.env.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "keys": run.train_batches.keys}) + "\n")


def _hang_for_the_test() -> None:
    """A rank that stops making progress: the watchdog's stack file names this frame."""
    while True:
        time.sleep(1)


def _saved_steps(run: Run) -> set[int]:
    last = checkpoint.latest(run.checkpoint_root)
    return {checkpoint.read_meta(last)["train_state"]["step"]} if last else set()


def evaluate_checkpoint(folder: Path, overrides: list[str]) -> dict[str, float]:
    """`mtdist eval`: student and teacher of a checkpoint on its val and test splits."""
    meta = checkpoint.read_meta(folder)
    data = meta["config"] | {"checkpoint": meta["config"]["checkpoint"] | {"resume": str(folder)}}
    data["logging"] = data["logging"] | {"wandb": "disabled", "run_dir": str(folder / "eval")}
    cfg = load_config_dict(data, overrides)
    run = build_run(cfg, exact_resume=False)
    out: dict[str, float] = {"step": run.state.step}
    for split in ("val", "test"):
        spec = getattr(cfg.data, split)
        if spec:
            out |= evaluate_both(run, spec, run.state.step, split)
    return out
