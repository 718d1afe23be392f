"""The one training loop, for every engine: `llmpy train` (llm.c's train_gpt2.cu main()).

The loop owns everything that is not model math: data, the LR schedule, gradient
accumulation, clipping, outlier and NaN skipping, validation, HellaSwag, sampling,
checkpoints and logs. Engines (llmpy.engines) only do forward, backward and AdamW; the flags
are parsed and checked in llmpy.settings, models are loaded by llmpy.models, gradients cross
ranks in llmpy.dist.

Per step, in llm.c's order: validation, HellaSwag and sampling when due, a checkpoint when
due, then (unless it is the last step) one optimizer step over -d tokens:
  zero_grad; grad_accum x (next_batch, forward, backward(1/grad_accum)); grad_norm;
  skip the update if the loss or norm is an outlier or not finite; else
  step(lr(step), t=step+1, grad_scale=min(1, 1/norm)).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .config import ModelConfig
from .errors import BadToken, LlmpyError, TrainingStopped
from .logger import Logger
from .models import cuda_available, engine_options, load_model, peek_config, \
    pick_engine_and_device
from .outlier_detector import OutlierDetector
from .preempt import StopOnSignal
from .run_dir import check_out_dir, check_resume, new_run_id, run_record
from .schedulers import get_lr
from .progress import print_startup, print_step, save_run_config
from .sample import prompt_ids
from .settings import RunConfig, parse_args, validate

GRAD_CLIP = 1.0


@dataclass
class Run:
    """Everything one training run holds between steps."""
    rc: RunConfig
    dist: object                  # llmpy.dist.Dist
    engine_name: str
    device: str
    config: ModelConfig
    train_glob: str
    val_glob: str
    train_loader: object          # llmpy.data.loader.DistributedDataLoader
    val_loader: object | None
    hs_loader: object | None      # llmpy.data.loader.EvalLoader (-h 1)
    total_batch: int
    grad_accum: int
    steps: int
    val_batches: int
    start_step: int = 0
    resume_state: dict | None = None
    engine: object = None
    sync: object = None           # llmpy.dist.GradSync
    loss_det: OutlierDetector = field(default_factory=OutlierDetector)
    norm_det: OutlierDetector = field(default_factory=OutlierDetector)
    logger: Logger | None = None
    overfit_batch: tuple | None = None
    step_times: list = field(default_factory=list)
    t_start: float = 0.0          # perf_counter at the loop's start, for elapsed
    t_steps: float = 0.0          # ... at the first optimizer step's start, for the ETA
    summary: dict = field(default_factory=dict)
    run_id: str = ""              # this run's id: in its DONE markers and state files


# ----------------------------------------------------------------------------------------
# setting up: data, resume point, model

def train(rc: RunConfig, given: set[str] | None = None) -> dict:
    """Run training as configured. Returns a summary dict (losses, final val loss, ...).
    `given` (the flags set explicitly, from parse_args) is accepted so that
    train(*parse_args(argv)) reads naturally; the loop itself needs only the RunConfig."""
    from .dist import init as init_dist

    validate(rc)
    engine_name, device = pick_engine_and_device(rc.engine, rc.device)
    dist = init_dist(rc, device, engine_name)
    try:
        check_out_dir(rc, dist.master)
        run = setup(rc, dist, engine_name, device)
        return loop(run)
    finally:
        dist.shutdown()


def setup(rc: RunConfig, dist, engine_name: str, device: str) -> Run:
    """Data first (bad shards fail before anything big is allocated), then the resume point,
    then the model and its engine."""
    if dist.world > 1 and device == "cuda":
        device = f"cuda:{dist.local_rank}"
    if rc.zero and dist.world == 1 and dist.master:
        print("note: -z 1 with one process is the same as -z 0")
    if device.startswith("cuda"):  # -f: TF32 for fp32 matmuls and convolutions (llm.c's -f)
        import torch
        torch.backends.cuda.matmul.allow_tf32 = bool(rc.tf32)
        torch.backends.cudnn.allow_tf32 = bool(rc.tf32)
    run = _data(rc, dist, engine_name, device, peek_config(rc.init or "d12"))
    run.run_id = new_run_id()
    if rc.sample_every or not rc.train_data:  # a bad prompt or vocab fails now, not mid-run
        prompt_ids(rc.prompt, run.config)
    if rc.resume and ckpt.latest_step(rc.out_dir) is not None:
        run.start_step = ckpt.latest_step(rc.out_dir)
        run.resume_state = ckpt.load_for(rc.out_dir, run.start_step, dist.rank, dist.world)
        saved = (run.resume_state["state"]["extra"] or {}).get("run")
        check_resume(rc, saved, run.start_step, run.steps, rc.out_dir)
        run.run_id = (saved or {}).get("run_id") or run.run_id
        run.config = run.resume_state["config"]
        params = run.resume_state["params"]
    else:
        run.config, params = load_model(rc.init or "d12", seed=rc.seed)
    _make_engine(run, params)
    return run


def _data(rc: RunConfig, dist, engine_name: str, device: str, config: ModelConfig) -> Run:
    from .data.loader import DistributedDataLoader, EvalLoader

    train_glob, val_glob = rc.train_data, rc.val_data
    if not train_glob or not val_glob:  # the default of each, as llm.c's: tinyshakespeare
        from .data.tinyshakespeare import ensure_tinyshakespeare
        train_path, val_path = ensure_tinyshakespeare()
        train_glob, val_glob = train_glob or str(train_path), val_glob or str(val_path)
    shuffle = bool(rc.shuffle)
    if rc.overfit and val_glob:  # -a 1, as llm.c: every step sees the first val batch
        train_glob, shuffle = val_glob, False
    B, T, world = rc.batch_size, rc.seq_len, dist.world
    if T > config.max_seq_len:
        raise LlmpyError(f"-t: expected at most the model's maxT {config.max_seq_len}, got {T}")
    tokens_per_micro = B * T * world
    total_batch = rc.total_batch if rc.total_batch != -1 else tokens_per_micro
    if total_batch % tokens_per_micro:
        raise LlmpyError(f"-d: total batch {total_batch} must be divisible by B*T*processes = "
                         f"{B}*{T}*{world} = {tokens_per_micro}")
    # -a 1 reads only the first batch, so its shard need not hold a whole step
    train_loader = DistributedDataLoader(train_glob, B, T, dist.rank, world, shuffle=shuffle,
                                         seed=rc.seed, step_samples=None if rc.overfit else
                                         total_batch // (B * T),
                                         vocab_size=(V := config.vocab_size))
    val_loader = DistributedDataLoader(val_glob, B, T, dist.rank, world, vocab_size=V) \
        if val_glob else None
    if val_loader is not None and rc.val_every > 0 and val_loader.batches_per_epoch < 1:
        val_loader = None
    steps = rc.max_steps
    if steps == -1:
        steps = train_loader.tokens_per_epoch // total_batch
        if steps < 1:
            raise LlmpyError(f"-d: one epoch of {train_glob} ({train_loader.tokens_per_epoch} "
                             f"tokens) is smaller than one step of {total_batch} tokens")
    val_batches = 0
    if val_loader is not None and rc.val_every > 0:
        avail = val_loader.batches_per_epoch
        val_batches = avail if rc.val_batches == -1 else min(rc.val_batches, avail)
    hs_loader = None
    if rc.hellaswag:
        from .evals import default_eval_path
        hs_file = rc.hellaswag_file or str(default_eval_path("hellaswag"))
        if not Path(hs_file).is_file():
            raise LlmpyError(f"-h 1: HellaSwag eval file {hs_file} not found (build it with "
                             f"`llmpy data hellaswag`, or pass --hellaswag-file)")
        hs_loader = EvalLoader(hs_file, B - B % 4 or 4, T, dist.rank, world, vocab_size=V)
    return Run(rc=rc, dist=dist, engine_name=engine_name, device=device, config=config,
               train_glob=train_glob, val_glob=val_glob, train_loader=train_loader,
               val_loader=val_loader, hs_loader=hs_loader, total_batch=total_batch,
               grad_accum=total_batch // tokens_per_micro, steps=steps,
               val_batches=val_batches)


def _make_engine(run: Run, params: np.ndarray) -> None:
    """The engine with `params`, the gradient sync, and on resume the optimizer, loader and
    outlier-detector state of the checkpoint."""
    from .dist import GradSync
    from .engines import make_engine

    run.engine = make_engine(run.engine_name, run.config,
                             **engine_options(run.engine_name, run.device, run.rc))
    run.engine.set_params(params)
    run.sync = GradSync(run.engine, run.dist, run.rc.zero, overlap=run.rc.overlap)
    if run.resume_state is not None:
        st = run.resume_state["state"]
        run.engine.set_optimizer_state(st["m"], st["v"], st["master"])
        extra = st["extra"] or {}
        if "loader" in extra:
            run.train_loader.load_state_dict(extra["loader"])
        else:  # written by llm.c: its loader position is in the state header
            run.train_loader.resume_llmc(int(st["shard_idx"]), int(st["sample_idx"]),
                                         int(st["nproc"]))
        if "outliers" in extra:
            run.loss_det.load_state_dict(extra["outliers"]["loss"])
            run.norm_det.load_state_dict(extra["outliers"]["norm"])


# ----------------------------------------------------------------------------------------
# the loop

def loop(run: Run) -> dict:
    rc, dist = run.rc, run.dist
    if dist.master:
        print_startup(run)
        save_run_config(run)
    run.logger = Logger(rc.out_dir, resume=bool(rc.resume), enabled=dist.master)
    run.summary = {"losses": {}, "val_losses": {}, "skipped": [], "steps": run.steps,
                   "engine": run.engine_name, "device": run.device}
    run.t_start = time.perf_counter()
    with StopOnSignal() as stop:
        for step in range(run.start_step, run.steps + 1):
            last_step = step == run.steps
            evaluate(run, step, last_step)
            resumed_here = run.resume_state is not None and step == run.start_step
            saved = resumed_here  # this step's checkpoint is on disk
            if rc.out_dir and not resumed_here and step > 0 and (
                    (rc.checkpoint_every and step % rc.checkpoint_every == 0) or last_step):
                save_checkpoint(run, step)
                saved = True
            if last_step:
                break
            loader_at_step = run.train_loader.state_dict()
            try:
                optimizer_step(run, step)
            except BadToken as e:
                _stop_on_bad_token(run, step, e, loader_at_step, saved)
            if dist.agree_any(stop.requested):  # SIGTERM/SIGINT: checkpoint, then stop
                _stop(run, step + 1, stop)
    run.logger.close()
    if run.step_times:
        run.summary["median_step_s"] = float(np.median(run.step_times))
        run.summary["tokens_per_s"] = run.total_batch / run.summary["median_step_s"]
    run.summary["engine_obj"] = run.engine
    return run.summary


def _stop(run: Run, step: int, stop: StopOnSignal) -> None:
    if run.rc.out_dir:
        save_checkpoint(run, step)
    run.logger.close()
    raise stop.stopped(step, ckpt.model_path(run.rc.out_dir, step) if run.rc.out_dir else None)


def _stop_on_bad_token(run: Run, step: int, e: BadToken, loader_at_step: dict,
                       saved: bool) -> None:
    """A token id >= V met mid-step: nothing of this step is applied yet, so the run up to
    `step` is saved (with -o; with several processes by all of them, once they agreed)
    before the one-line error, and -y 1 loses nothing once the shard is fixed."""
    out = run.rc.out_dir
    run.logger.close()
    if not out:
        where = "nothing saved (no -o)"
    elif step == 0:
        where = "no step completed, nothing to save"
    else:  # every rank is here (optimizer_step agreed), so the checkpoint is collective
        if not saved:
            run.train_loader.load_state_dict(loader_at_step)  # the step's samples, again
            save_checkpoint(run, step)
        where = f"the run is saved at step {step} ({ckpt.model_path(out, step)}): fix " \
                f"the shard, then continue with -y 1"
    raise LlmpyError(f"step {step}: {e}; {where}") from None


def evaluate(run: Run, step: int, last_step: bool) -> None:
    """Validation, HellaSwag and a sample, each when due at this step."""
    from .evals import hellaswag_counts, val_loss
    from .sample import sample_text

    rc, dist, engine = run.rc, run.dist, run.engine
    due = rc.val_every and (step % rc.val_every == 0 or last_step)
    if run.val_batches and due:
        bar = None if dist.master else False  # a bar when rank 0's stderr is a terminal
        vl = dist.mean(val_loss(engine, run.val_loader, run.val_batches, progress=bar))
        run.summary["val_losses"][step] = vl
        run.logger.val(step, vl)
        if dist.master:
            print(f"val loss {vl:.6f}")
    if run.hs_loader is not None and due:
        correct, total = hellaswag_counts(engine, run.hs_loader,
                                          progress=None if dist.master else False)
        acc = dist.sum(correct) / max(dist.sum(total), 1)
        run.logger.hellaswag(step, acc)
        if dist.master:
            print(f"HellaSwag: {acc:.4f}")
    if dist.master and rc.sample_every and ((step > 0 and step % rc.sample_every == 0)
                                            or last_step):
        text = sample_text(engine, rc.prompt, rc.gen_tokens, rc.temperature, rc.top_k,
                           seed=rc.seed + step)
        print(f"generating:\n---\n{text}\n---")


def optimizer_step(run: Run, step: int) -> None:
    """One AdamW step over total_batch tokens, or a skipped one (outlier, non-finite)."""
    rc, dist, engine = run.rc, run.dist, run.engine
    t0 = time.perf_counter()
    if step == run.start_step:
        run.t_steps = t0
    engine.zero_grad()
    loss, bad = 0.0, None  # bad: a token id >= V this rank met (one process: raised at once)
    for micro in range(run.grad_accum):
        if rc.overfit:
            run.overfit_batch = run.overfit_batch or run.train_loader.next_batch()
            x, y = run.overfit_batch
        else:
            x, y, err = run.train_loader.next_batch_or_zeros() if dist.world > 1 else \
                (*run.train_loader.next_batch(), None)
            bad = bad or err
        loss += engine.forward(x, y) / run.grad_accum
        run.sync.arm(micro == run.grad_accum - 1)  # gradients cross ranks during this one
        engine.backward(1.0 / run.grad_accum)
    loss = dist.mean(loss)    # identical on every rank from here on
    norm = run.sync.reduce()  # averages gradients across ranks; the global norm
    if dist.agree_any(bad is not None):  # all ranks stop, save and say so (loop)
        raise bad or BadToken("a batch of another rank", "token id", "an id < V = "
                              f"{run.config.vocab_size}", "a larger one", "that rank's line "
                              "names its shard")
    zloss, znorm = run.loss_det.update(loss), run.norm_det.update(norm)
    lr = get_lr(rc.scheduler, step, rc.lr, rc.warmup, run.steps, rc.final_lr_frac)
    # every decision is agreed (a rank's arithmetic may differ): no rank waits alone
    finite = not dist.agree_any(not (math.isfinite(loss) and math.isfinite(norm)))
    skip = ""
    if not finite:
        if rc.nan_policy == "stop":
            run.logger.close()
            raise TrainingStopped(f"step {step}: non-finite loss {loss} or grad norm "
                                  f"{norm}; stopped before the update (--nan-policy stop)")
        skip = "non-finite"
    elif rc.skip_loss_z and zloss > rc.skip_loss_z:
        skip = f"loss z {zloss:.2f}"
    elif rc.skip_norm_z and znorm > rc.skip_norm_z:
        skip = f"norm z {znorm:.2f}"
    if dist.agree_any(bool(skip)) and not skip:
        skip = "another rank's outlier"
    if not skip:
        grad_scale = GRAD_CLIP / norm if norm > GRAD_CLIP else 1.0
        run.sync.step(lr, step + 1, weight_decay=rc.weight_decay, grad_scale=grad_scale)
    else:
        run.summary["skipped"].append(step)
    dt = time.perf_counter() - t0
    if step > run.start_step:  # the first step includes warm-up (compile, allocation)
        run.step_times.append(dt)
    run.summary["losses"][step] = loss
    comm_ms = run.sync.comm_s * 1e3 if dist.world > 1 else None
    run.logger.train(step, loss, lr, norm, skipped=skip or None, ms=dt * 1e3, comm_ms=comm_ms)
    if dist.master:
        print_step(run, step, loss, zloss, norm, znorm, lr, dt, skip, comm_ms)


# ----------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(run: Run, step: int) -> None:
    """model (rank 0), state (every rank), then DONE once every rank's files are on disk: a
    crash at any point leaves the previous checkpoint as the newest complete one. Then
    -nk/-nm retention."""
    rc, dist, out = run.rc, run.dist, run.rc.out_dir
    if dist.rank == 0:  # a DONE of an earlier write of this step would vouch for new files
        ckpt.done_path(out, step).unlink(missing_ok=True)
    dist.barrier()
    if dist.rank == 0:
        ckpt.save_model(out, step, run.engine)
    ckpt.kill_point("in_checkpoint", step)
    extra = {"outliers": {"loss": run.loss_det.state_dict(), "norm": run.norm_det.state_dict()},
             "run": run_record(rc, run.run_id)}
    ckpt.save_state(out, step, run.engine, rank=dist.rank, nproc=dist.world,
                    loader_state=run.train_loader.state_dict(), extra=extra,
                    shard=run.sync.shard)
    dist.barrier()
    if dist.rank == 0:
        ckpt.mark_done(out, step, run.run_id)
        ckpt.apply_retention(out, rc.keep_last, rc.major_every, run_id=run.run_id)
        print(f"checkpoint: {ckpt.model_path(out, step)} (+ state, DONE)", flush=True)
    ckpt.kill_point("after_checkpoint", step)


def main(argv: list[str]) -> int:
    from .sample import sample_text

    has_cuda = cuda_available() and "cpu" not in argv  # picks the main job's size
    rc, given = parse_args(argv, has_cuda=has_cuda)
    t0 = time.time()
    summary = train(rc, given)
    if rc.process_rank == 0:
        main_job = not given & {"train_data", "val_data", "init", "overfit"}
        final = summary["val_losses"].get(summary["steps"])
        print(f"{'main job' if main_job else 'training'} done in {time.time() - t0:.0f} s: "
              + (f"final val loss {final:.4f}" if final is not None else "no validation"))
        if main_job:
            text = sample_text(summary["engine_obj"], rc.prompt, rc.gen_tokens,
                               rc.temperature, rc.top_k, seed=rc.seed + summary["steps"])
            print("sample:\n---\n" + text + "\n---")
        if rc.out_dir:
            print(f"logs, settings and checkpoint in {rc.out_dir}/ (main.log, metrics.jsonl, "
                  f"run_config.json, model_*.bin, state_*.bin, DONE_*)")
    return 0
