"""Distribution: process groups, gradient averaging and ZeRO-1, for the torch and triton
engines. Mirrors llm.c's llmc/zero.cuh (multi_gpu_config_init, ZeRO-1 sharding).

Launchers, detected from the environment (llm.c's -pn/-pr/-pg/-pi/-ps/-pf flags override):
- torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): init_method env://
- mpirun (OMPI_COMM_WORLD_* or PMI_*): ranks from MPI's environment; rendezvous by -pi tcp
  (-ps server), -pi fs (-pf shared dir), or -pi mpi (rank 0's address sent with mpi4py)
- slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID): likewise, with -pi fs|tcp

Data parallel: every rank runs the same model on its own slice of the batch; after the
backward the loop averages gradients across ranks (all-reduce). With ZeRO-1 (-z 1) the
gradients are reduce-scattered instead, each rank updates its 1/world shard of the flat
parameters with its own shard of AdamW m, v (and master weights), and the parameters are
all-gathered. Every decision that changes which collectives run (skip an update, stop on a
NaN) is agreed across ranks first (`agree_any`), so no rank waits alone in a collective.
Model code knows nothing of this: engines that can run in several processes (the
`distributed` attribute of the engine contract, llmpy.engines) expose `flat` and `flat_grad`
(torch tensors) and, for ZeRO-1, `step(..., shard=(start, end))`; `GradSync` below drives them.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from .errors import LlmpyError

TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("LLMPY_DIST_TIMEOUT_MIN", "10")))


@dataclass
class Dist:
    """This process's place in the job. world == 1 needs no torch.distributed at all."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def master(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops for one process) -------------------------------------------

    def all_reduce_avg_(self, t):
        """Average a tensor across ranks, in place."""
        if self.world == 1:
            return t
        import torch.distributed as tdist
        if self.backend == "nccl":
            tdist.all_reduce(t, op=tdist.ReduceOp.AVG)
        else:  # gloo has no AVG
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t.div_(self.world)
        return t

    def mean(self, x: float) -> float:
        """The average of a Python float over ranks (losses for logging, val, decisions)."""
        if self.world == 1:
            return x
        import torch
        t = torch.tensor([x], dtype=torch.float64, device=self._device())
        return float(self.all_reduce_avg_(t).item())

    def sum(self, x: float) -> float:
        if self.world == 1:
            return x
        import torch
        import torch.distributed as tdist
        t = torch.tensor([x], dtype=torch.float64, device=self._device())
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return float(t.item())

    def agree_any(self, flag: bool) -> bool:
        """True on every rank if it is true on any rank."""
        if self.world == 1:
            return bool(flag)
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist
            tdist.barrier()

    def shard_range(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of a flat buffer of n elements (the last shard may be
        shorter; llm.c requires n divisible by world, we do not)."""
        size = -(-n // self.world)
        start = min(self.rank * size, n)
        return start, min(start + size, n)

    def reduce_scatter_avg_(self, flat):
        """Average `flat` across ranks; afterwards this rank's shard of it is exact (the rest
        may be stale). Returns the shard view."""
        start, end = self.shard_range(flat.numel())
        if self.world == 1:
            return flat[start:end]
        import torch.distributed as tdist
        if self.backend == "nccl" and flat.numel() % self.world == 0:
            out = flat.new_empty(end - start)
            tdist.reduce_scatter_tensor(out, flat, op=tdist.ReduceOp.AVG)
            flat[start:end].copy_(out)
        else:  # gloo, or a size that does not split evenly
            self.all_reduce_avg_(flat)
        return flat[start:end]

    def all_gather_(self, flat) -> None:
        """Every rank's shard of `flat` to every rank, in place."""
        if self.world == 1:
            return
        import torch.distributed as tdist
        start, end = self.shard_range(flat.numel())
        if self.backend == "nccl" and flat.numel() % self.world == 0:
            tdist.all_gather_into_tensor(flat, flat[start:end].clone())
        else:  # gloo: zeros but for my shard, summed over ranks
            mine = flat[start:end].clone()
            flat.zero_()
            flat[start:end].copy_(mine)
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)

    def _device(self):
        import torch
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def shutdown(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist
            if tdist.is_initialized():
                tdist.destroy_process_group()


def _env_int(*names: str) -> int | None:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return None


def detect(rc) -> tuple[int, int, int, str]:
    """(rank, world, local_rank, launcher) from flags, then torchrun, MPI or slurm."""
    if rc.num_processes > 1:
        local = rc.process_rank % max(rc.gpus_per_node, 1)
        return rc.process_rank, rc.num_processes, local, "flags"
    world = _env_int("WORLD_SIZE")
    if world is not None and "RANK" in os.environ:
        return _env_int("RANK"), world, _env_int("LOCAL_RANK") or 0, "torchrun"
    world = _env_int("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS")
    if world is not None:
        rank = _env_int("OMPI_COMM_WORLD_RANK", "PMI_RANK")
        local = _env_int("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
        return rank, world, local if local is not None else rank % max(rc.gpus_per_node, 1), "mpi"
    world = _env_int("SLURM_NTASKS")
    if world is not None and world > 1:
        return _env_int("SLURM_PROCID"), world, _env_int("SLURM_LOCALID") or 0, "slurm"
    return 0, 1, 0, "single"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_method(rc, launcher: str, rank: int) -> str:
    if launcher == "torchrun":
        return "env://"
    if rc.init_method == "tcp":
        if not rc.server_ip:
            raise LlmpyError("-ps: -pi tcp needs the rendezvous server's address, got none")
        host, _, port = rc.server_ip.partition(":")
        return f"tcp://{host}:{port or 29500}"
    if rc.init_method == "fs":
        if not rc.fs_path:
            raise LlmpyError("-pf: -pi fs needs a directory shared by all processes, got none")
        os.makedirs(rc.fs_path, exist_ok=True)
        # one file per slurm job step, so a relaunch never meets the file of a crashed one
        job = "_".join(os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_STEP_ID")
                       if k in os.environ)
        return "file://" + os.path.join(os.path.abspath(rc.fs_path),
                                        "llmpy_rendezvous" + (f"_{job}" if job else ""))
    if "MASTER_ADDR" in os.environ:
        return "env://"
    try:  # -pi mpi: rank 0 picks an address and a port and sends them to everyone
        from mpi4py import MPI
    except ImportError:
        raise LlmpyError("-pi mpi: needs mpi4py (pip install mpi4py), or MASTER_ADDR and "
                         "MASTER_PORT in the environment, or -pi tcp -ps HOST[:PORT] / "
                         "-pi fs -pf DIR") from None
    addr = (socket.gethostbyname(socket.gethostname()), _free_port()) if rank == 0 else None
    host, port = MPI.COMM_WORLD.bcast(addr, root=0)
    return f"tcp://{host}:{port}"


# -pi fs: the key the last process to arrive adds to the rendezvous file: every process has met. A file
# holding it belongs to a launch that got past its rendezvous; torch deletes the file when
# the last process of a run leaves it cleanly, so one still there was left by a killed run.
RENDEZVOUS_DONE = "llmpy_rendezvous_complete"
RENDEZVOUS_ARRIVED = "llmpy_rendezvous_arrived"  # how many processes got past their init


def _remove_stale_rendezvous(path: str) -> bool:
    """Delete the -pi fs file `path` if a finished launch left it (it holds RENDEZVOUS_DONE),
    under an flock on `path`.lock, so that of several processes checking at once only the
    first deletes it and none deletes the new file of this launch."""
    import fcntl
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path, "rb") as f:
                stale = RENDEZVOUS_DONE.encode() in f.read()
        except FileNotFoundError:
            return False
        if stale:
            os.unlink(path)
        return stale


def _rendezvous_failed(path: str) -> None:
    """A -pi fs rendezvous that cannot complete (timeout, error, Ctrl-C): its file would make
    the next launch wait, so it goes (the other processes of this launch fail as well)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _rendezvous_timeout(method: str, world: int) -> None:
    stale = ""
    if method.startswith("file://"):
        path = method[len("file://"):]
        _rendezvous_failed(path)
        stale = (f"; removed its file {path} (a run killed while it waited leaves one): "
                 f"relaunch all processes")
    print(f"llmpy train: error: rendezvous {method}: {world} processes did not meet within "
          f"{TIMEOUT} (LLMPY_DIST_TIMEOUT_MIN){stale}", file=sys.stderr, flush=True)
    os._exit(2)


def init(rc, device: str, engine: str = "torch") -> Dist:
    """Join the job (or not, for one process). NCCL on CUDA, gloo on the CPU. An engine
    that runs in one process only is refused before the rendezvous (where it would wait)."""
    rank, world, local, launcher = detect(rc)
    if world == 1:
        return Dist()
    if engine == "numpy":
        raise LlmpyError(f"--engine numpy: runs in one process only, got {world} processes "
                         f"({launcher}); use --engine torch or triton for multi-process "
                         f"training")
    import torch
    import torch.distributed as tdist
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    method = init_method(rc, launcher, rank)
    # a file rendezvous waits forever on a stale file (torch's timeout does not cover it):
    # after TIMEOUT this process says so in one line and exits 2
    watchdog = threading.Timer(TIMEOUT.total_seconds(), _rendezvous_timeout, (method, world))
    watchdog.daemon = True
    watchdog.start()
    try:
        if method.startswith("file://"):
            _file_rendezvous(method[len("file://"):], backend, rank, world)
        else:
            tdist.init_process_group(backend=backend, init_method=method, rank=rank,
                                     world_size=world, timeout=TIMEOUT)
    except RuntimeError as e:  # torch's DistError and gloo/NCCL connection errors
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LlmpyError(f"rendezvous {method} as rank {rank} of {world}: {first} (are all "
                         f"{world} processes started with the same -pi/-pf/-ps?)") from None
    finally:
        watchdog.cancel()
    return Dist(rank=rank, world=world, local_rank=local, backend=backend)


def _file_rendezvous(path: str, backend: str, rank: int, world: int) -> None:
    """-pi fs: meet in a torch FileStore at `path`. A file left by a killed run (it holds
    RENDEZVOUS_DONE) is removed first and said so; this launch's file gets RENDEZVOUS_DONE
    once everyone has met; a rendezvous that fails removes its file."""
    import torch.distributed as tdist
    if _remove_stale_rendezvous(path):
        print(f"note: -pi fs: removed {path}, left by an earlier launch that was killed "
              f"after its rendezvous; meeting in a new one", flush=True)
    try:
        store = tdist.FileStore(path, world)
        tdist.init_process_group(backend=backend, store=store, rank=rank, world_size=world,
                                 timeout=TIMEOUT)
    except BaseException:
        _rendezvous_failed(path)
        raise
    # NCCL's init returns before the other ranks have joined, so "everyone has met" is
    # counted: the last process to arrive marks the file
    if store.add(RENDEZVOUS_ARRIVED, 1) == world:
        store.set(RENDEZVOUS_DONE, "1")


class GradSync:
    """Gradients across ranks, and the AdamW step: whole (ZeRO-0: all-reduce, every rank
    updates every parameter) or sharded (ZeRO-1: each gradient reduced to the rank that owns
    it, each rank updates its 1/world slice of the flat parameters and AdamW state, then
    all-gather). One process: the engine's own grad_norm and step, untouched.

    Buckets are the ranges the engine reports through its `grad_ready` hook during the last
    micro-step's backward (the loop calls `arm(True)` before it). With overlap each bucket's
    collective starts at once, asynchronously, and `reduce` waits on them all; without, the
    same collectives on the same buckets run after the backward, so both give bitwise the
    same gradients. `comm_s` is the time this step spent blocked in collectives."""

    def __init__(self, engine, dist: Dist, zero: int, overlap: bool = True):
        self.engine, self.dist, self.overlap = engine, dist, bool(overlap)
        self.shard, self.armed, self.buckets, self.handles = None, False, [], []
        self.comm_s = 0.0
        if dist.world > 1:
            if not engine.distributed:
                raise LlmpyError(f"--engine {engine.name}: runs in one process only; use "
                                 f"--engine torch or triton for multi-process training")
            if zero:
                self.shard = dist.shard_range(engine.config.num_params)
            engine.grad_ready = self._ready

    def arm(self, last_micro_step: bool) -> None:
        """Called before each backward: only the last micro-step's gradients cross ranks."""
        self.armed = last_micro_step
        if last_micro_step:
            self.buckets, self.handles, self.comm_s = [], [], 0.0

    def _ready(self, ranges) -> None:
        if not self.armed:
            return
        self.buckets.append(list(ranges))
        if self.overlap:
            self._launch(ranges)

    def _launch(self, ranges) -> None:
        """SUM each range across ranks (ZeRO-1: onto the ranks owning its pieces), async."""
        import torch.distributed as tdist
        grad, SUM = self.engine.flat_grad, tdist.ReduceOp.SUM
        for a, b in ranges:
            if self.shard is None:
                self.handles.append(tdist.all_reduce(grad[a:b], op=SUM, async_op=True))
                continue
            size = -(-grad.numel() // self.dist.world)
            for owner in range(a // size, (b - 1) // size + 1):
                lo, hi = max(a, owner * size), min(b, (owner + 1) * size)
                self.handles.append(tdist.reduce(grad[lo:hi], dst=owner, op=SUM,
                                                 async_op=True))

    def _wait(self) -> None:
        if not self.overlap:
            for ranges in self.buckets:
                self._launch(ranges)
        t0 = time.perf_counter()
        for h in self.handles:
            h.wait()
        self.comm_s += time.perf_counter() - t0
        self.handles = []
        covered = sum(b - a for ranges in self.buckets for a, b in ranges)
        if covered != self.engine.config.num_params:
            raise RuntimeError(f"GradSync: the engine reported {covered} gradients ready, "
                               f"expected {self.engine.config.num_params} (arm() before the "
                               f"last backward?)")

    def reduce(self) -> float:
        """Average the gradients over ranks; return the global gradient norm."""
        if self.dist.world == 1:
            return self.engine.grad_norm()
        self._wait()
        grad = self.engine.flat_grad
        if self.shard is None:
            grad.div_(self.dist.world)
            return self.engine.grad_norm()
        import torch
        mine = grad[self.shard[0]:self.shard[1]]
        mine.div_(self.dist.world)
        sq = torch.linalg.vector_norm(mine, dtype=torch.float32).item() ** 2
        t0 = time.perf_counter()
        norm = math.sqrt(self.dist.sum(sq))
        self.comm_s += time.perf_counter() - t0
        return norm

    def step(self, lr: float, t: int, **hyper) -> None:
        if self.shard is None:
            self.engine.step(lr, t, **hyper)
            return
        self.engine.step(lr, t, shard=self.shard, **hyper)
        t0 = time.perf_counter()
        self.dist.all_gather_(self.engine.flat)
        self.comm_s += time.perf_counter() - t0
