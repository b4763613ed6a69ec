"""Training in several processes, on the launchers users already run: `torchrun` (and
`accelerate launch`, which starts torchrun's workers) set RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR; slmops joins that process group (gloo on CPU, NCCL on GPU) and trains data-parallel.

What N processes compute, and why it equals one process with the same global batch:
- the global batch is per_device_train_batch_size x world size x gradient_accumulation_steps;
  each optimizer step's global batches are the ones one process would draw (the same seeded
  order), and rank r trains on the r-th slice of each;
- the loss of a step is normalised by the labelled tokens of the whole global step (summed
  over ranks before the backward), and the gradients are summed over ranks (one all-reduce of
  one flat buffer per step): exactly the one-process gradient, up to float summation order;
- so every rank holds the same weights and optimizer state after every step: evaluation is
  split over ranks and summed, and only rank 0 writes (logs, TensorBoard, checkpoints, outputs).
Dropout draws differ from one process's (each rank has its own generator, seeded with the run's
seed and its rank): with dropout N processes train the same model statistically, not bit for bit.

This is PyTorch's own data parallelism written for slmops' loop (the loop normalises by tokens
over the whole step, which DistributedDataParallel's gradient averaging would not): the
collectives are torch.distributed's."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch

from slmops.errors import ConfigError, SlmopsError
from slmops.machine import available_cores, threads_setting

log = logging.getLogger("slmops")


class DistributedError(SlmopsError):
    """Another process of the run failed, was killed, or stopped answering."""


class SilentStop(SlmopsError):
    """A rank > 0 stopping because the run failed its checks: rank 0 says why, once."""

    silent = True

    def __init__(self, exit_code: int):
        super().__init__("stopped with the other processes of the run")
        self.exit_code = exit_code


def stopped_message(detail: str) -> str:
    return (f"the run stopped: another process of it failed or was killed ({detail}); the last checkpoint is kept: "
            "run the same command with --resume_from_checkpoint latest to continue")

MESSAGE_BYTES = 2048  # an error message shared between ranks (encoded, padded)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None  # None: one process
    threads: int | None = None  # CPU threads of this process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        if not self.distributed:
            return "1 process"
        return (f"{self.size} processes ({self.local_size} on this machine, {self.threads} CPU thread(s) each), "
                f"backend {self.backend}")

    # -- collectives (no-ops in one process) ----------------------------------------------------
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place."""
        if self.distributed:
            self._collective(torch.distributed.all_reduce, tensor, torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            self._collective(torch.distributed.barrier)

    def agree(self, error: BaseException | None) -> None:
        """Every rank reaches here with its own outcome of the same checks; if any rank failed,
        every rank stops, so no rank waits for the others in a collective that will never come.
        Rank 0 raises the error (its own, or the first failing rank's, named); the other ranks
        stop silently (SilentStop): one message for the run, as one process would give."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        mine = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
        if error is not None:
            text = f"{type(error).__name__}\n{error}".encode()[:MESSAGE_BYTES]
            mine[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        gathered = [torch.zeros_like(mine) for _ in range(self.size)]
        self._collective(torch.distributed.all_gather, gathered, mine)
        failed = [rank for rank, message in enumerate(gathered) if int(message.sum()) != 0]
        if not failed:
            return
        if self.rank != 0:
            self.barrier()  # until rank 0 has said why (the launcher ends it as soon as one process exits)
            raise SilentStop(2 if (error is not None and isinstance(error, ConfigError)) else 1) from None
        if error is None:
            kind, _, text = bytes(gathered[failed[0]].tolist()).rstrip(b"\0").decode(errors="replace").partition("\n")
            message = f"rank {failed[0]} stopped before training: {text}"
            error = ConfigError(message) if kind == "ConfigError" else DistributedError(f"{message} ({kind})")
        if isinstance(error, SlmopsError):
            print(f"slmops: error: {error}", file=sys.stderr, flush=True)
            error.reported = True  # (the command line prints it no more)
        self.barrier()
        raise error

    def _collective(self, op, *args) -> None:
        """A collective that turns a lost process into one clear error instead of a traceback (or a hang:
        the process group's timeout, SLMOPS_DIST_TIMEOUT seconds, bounds every wait)."""
        try:
            op(*args)
        except Exception as exc:  # gloo/NCCL: a peer closed its connection, or the timeout passed
            raise DistributedError(stopped_message(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)) from None


_WORLD: World | None = None


def world() -> World:
    """This process's place in the run: joined from torchrun's environment on first use."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _join()
    return _WORLD


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _join() -> World:
    if not launched():
        return World()
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("SLMOPS_DIST_TIMEOUT", "600")))
        dist.init_process_group(backend=backend, timeout=timeout)
    _stop_on_sigterm()
    threads = _share_cores(local_size)
    joined = World(rank, size, local_rank, local_size, backend, threads)
    if rank != 0:  # one voice: the other ranks say only what goes wrong
        logging.getLogger("slmops").setLevel(logging.ERROR)
    return joined


SIGTERM_GRACE_S = 5.0  # torchrun waits 30 s after its SIGTERM before it kills


def _stop_on_sigterm() -> None:
    """torchrun ends the other processes with SIGTERM when one fails: say so, in one line.

    Python runs a signal handler only between bytecodes of the main thread, so a process blocked
    in a C++ call (a gloo collective waiting on the dead peer, a long kernel) would not react
    before torchrun's SIGKILL and its user would see no reason. The C-level handler also writes
    the signal's number to a pipe (signal.set_wakeup_fd); a watcher thread reads it and, if the
    main thread has not stopped the process within SIGTERM_GRACE_S, says why and exits itself."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    handled = threading.Event()

    def stop(signum, frame):
        handled.set()
        raise DistributedError(stopped_message("the launcher stopped this process (SIGTERM)"))

    signal.signal(signal.SIGTERM, stop)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    if signal.set_wakeup_fd(write_end, warn_on_full_buffer=False) != -1:  # someone else's wakeup fd: leave it
        signal.set_wakeup_fd(-1)
        os.close(read_end), os.close(write_end)
        return
    threading.Thread(target=_exit_if_stuck_after_sigterm, args=(read_end, handled), daemon=True,
                     name="slmops-sigterm-watch").start()


def _exit_if_stuck_after_sigterm(read_end: int, handled) -> None:
    import signal
    import time

    while signal.SIGTERM not in (received := os.read(read_end, 64)):
        if not received:
            return
    deadline = time.monotonic() + SIGTERM_GRACE_S
    while time.monotonic() < deadline:
        time.sleep(0.1)
    if not handled.is_set():  # the main thread never got to say it
        sys.stderr.write(f"slmops: error: {stopped_message('the launcher stopped this process (SIGTERM)')}\n")
        sys.stderr.flush()
    os._exit(1)


def threads_per_process(local_size: int) -> int:
    """N processes on one machine share its cores: each takes cores / N threads (torchrun's
    own default is 1 thread each, which leaves most of a large machine idle).
    SLMOPS_NUM_THREADS sets another number."""
    return threads_setting() or max(1, available_cores() // max(local_size, 1))


def _share_cores(local_size: int) -> int:
    threads = threads_per_process(local_size)
    torch.set_num_threads(threads)
    return threads


def shutdown() -> None:
    global _WORLD
    if _WORLD is not None and _WORLD.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _WORLD = None


def sum_gradients(params: list[torch.nn.Parameter], world: World, extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum every parameter's gradient over ranks in one all-reduce (a flat buffer; a rank whose
    slice was empty contributes zeros), with `extra` (loss sums) riding along; returns `extra` summed."""
    if not world.distributed:
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + ([extra.float().reshape(-1)] if extra is not None else []))
    world.sum_(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        summed = flat[offset : offset + n].view_as(g).to(g.dtype)
        if p.grad is None:
            p.grad = summed
        else:
            p.grad.copy_(summed)
        offset += n
    return flat[offset:] if extra is not None else None
