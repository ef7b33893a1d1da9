"""Data-parallel training of one model under torchrun: every rank trains the same model on its part of every
global batch and the gradients are summed across ranks, so each step is the single-process step of the global
batch, equal up to float summation order.

    torchrun --nproc-per-node 2 -m taft train --data ... --out runs/mine       (more nodes: torchrun's --nnodes,
                                                                                --rdzv-endpoint, ... as usual)

- `launched()`: this process's place in a torchrun job (rank, world size, local rank: torchrun's RANK, WORLD_SIZE
  and LOCAL_RANK), None outside torchrun or in a job of one process (which trains as a single process).
- `rank_device(spec)`: where this rank computes: "auto" and "cuda" are cuda:LOCAL_RANK (one GPU per rank).
- `join(device)`: the job's `Group`, its process group started once (gloo on the CPU, NCCL on CUDA) with a finite
  timeout on every collective (`TIMEOUT_S`, or `TIMEOUT_ENV` seconds): a rank that dies or hangs ends the others
  with a one-line `TaftError` instead of a hang (torchrun also stops the whole job when one rank exits non-zero).
- `AllReduceStep`: plain training's gradient step under data parallelism.

What runs where (`taft.train.fit`): every rank reads the whole feature cache (an entry's build lock lets one
process build it while the others wait, then read it), draws the same seeded order of global batches and takes
its slice of each (`taft.train.steps.rank_part`), and evaluates the whole validation set (the same model
everywhere: the same numbers, in the wall time one process takes); only rank 0 writes files. DP-SGD and model
stores are refused under torchrun (`refuse_under_torchrun`).

Test hook: `FAULT_ENV` = "RANK:exit" makes that rank exit at once at its second step (as a killed process would),
"RANK:stall" makes it stop answering there.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from taft.devices import resolve_device
from taft.errors import NonFiniteError, TaftError
from taft.model import Classifier
from taft.train.config import TrainConfig
from taft.train.steps import AutogradStep

TIMEOUT_S = 600.0  # the longest a collective waits for the other ranks: far above a step's skew between ranks
TIMEOUT_ENV = "TAFT_DISTRIBUTED_TIMEOUT"
FAULT_ENV = "TAFT_TEST_RANK_FAULT"
FAULT_EXIT = 86


@dataclass(frozen=True)
class Launch:
    """A process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int


def launched() -> Launch | None:
    """This process's place in a torchrun job, None outside torchrun or in a job of one process."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return None
    try:
        launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except (KeyError, ValueError) as e:
        raise TaftError(f"torchrun's environment is incomplete: RANK, WORLD_SIZE and LOCAL_RANK must be integers "
                        f"({type(e).__name__}: {e})") from e
    if not 0 <= launch.rank < launch.world:
        raise TaftError(f"torchrun's environment is inconsistent: RANK {launch.rank}, WORLD_SIZE {launch.world}")
    return launch if launch.world > 1 else None


def is_rank_zero() -> bool:
    """Whether this process writes files and prints: rank 0 of a torchrun job, or a process outside torchrun."""
    launch = launched()
    return launch is None or launch.rank == 0


def refuse_under_torchrun(what: str, why: str) -> None:
    """A one-line `TaftError` when this process is a rank of a torchrun job: `what` does not run there (`why`)."""
    if launched() is not None:
        raise TaftError(f"{what} does not run under torchrun ({why}); run it as one process, without torchrun")


def refuse_private(dp: object | None) -> None:
    """Refuse DP-SGD (`dp` given) under torchrun, before any work: its Poisson sampling over the whole data set and
    its noise, once per step, would have to be drawn once for all ranks; it trains as one process."""
    if dp is not None:
        refuse_under_torchrun("DP-SGD training", "its Poisson sampling and noise are drawn for the whole data set by "
                                                 "one process")


def rank_device(spec: str | torch.device | None) -> torch.device:
    """`resolve_device(spec)`, except that under torchrun "auto" and "cuda" are this rank's GPU, cuda:LOCAL_RANK
    (the CPU where CUDA is not usable, for "auto"), and any other GPU is refused (`check_rank_device`)."""
    launch = launched()
    generic = isinstance(spec, str) and spec.strip().lower() in ("auto", "cuda")
    if launch is None or not generic or (spec.strip().lower() == "auto" and not torch.cuda.is_available()):
        return check_rank_device(resolve_device(spec), launch)
    return resolve_device(f"cuda:{launch.local_rank}")


def check_rank_device(device: torch.device, launch: Launch | None) -> torch.device:
    """`device`, when a rank of a torchrun job (`launch`) can train on it: the CPU or its own GPU."""
    if launch is None:
        return device
    if device.type not in ("cpu", "cuda"):
        raise TaftError(f"data-parallel training runs on CPUs (gloo) or CUDA GPUs (NCCL), not on {device}",
                        arguments=("device",))
    if device.type == "cuda" and device.index != launch.local_rank:
        raise TaftError(f"under torchrun each rank trains on its own GPU, cuda:LOCAL_RANK: rank {launch.rank} "
                        f"(local rank {launch.local_rank}) was given {device}; use device=auto or device=cuda",
                        arguments=("device",))
    return device


def timeout_s() -> float:
    """The collectives' timeout in seconds: `TIMEOUT_ENV` when set (a positive number), else `TIMEOUT_S`."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise TaftError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


@dataclass(frozen=True)
class Group:
    """The ranks of a torchrun job training one model together; this process is rank `rank` of `world`."""

    rank: int
    world: int
    timeout: float

    @property
    def part(self) -> tuple[int, int]:
        """(rank, world): which part of each global batch this rank takes (`taft.train.steps.rank_part`)."""
        return self.rank, self.world

    def failed(self, what: str, error: BaseException) -> TaftError:
        """The one-line error of a collective that failed: a peer died, or did not answer within the timeout."""
        reason = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(error).split()))[:160]  # without gloo's source line
        return TaftError(f"data-parallel training stopped on rank {self.rank}: {what} failed ({reason}); another "
                         f"rank failed, was stopped or did not answer within {self.timeout:g} s (see its error)")

    def all_reduce(self, tensor: torch.Tensor, what: str) -> None:
        """Sum `tensor` over the ranks in place (every rank gets the same bits)."""
        try:
            dist.all_reduce(tensor)
        except RuntimeError as e:  # gloo and NCCL report a lost peer or a timeout as RuntimeError subclasses
            raise self.failed(what, e) from e

    def check_same(self, value: str, what: str) -> None:
        """A one-line `TaftError` on every rank unless every rank passes the same `value` (a digest of `what`)."""
        values: list[str | None] = [None] * self.world
        try:
            dist.all_gather_object(values, value)
        except RuntimeError as e:
            raise self.failed(f"comparing the ranks' {what}", e) from e
        differ = [r for r, v in enumerate(values) if v != values[0]]
        if differ:
            raise TaftError(f"rank {differ[0]}'s {what} differs from rank 0's: every rank of a data-parallel run "
                            "must train on the same data with the same model and settings")


def join(device: torch.device) -> Group | None:
    """This rank's `Group` under torchrun (None outside it), training on `device`: the CPU (gloo) or this rank's
    GPU, cuda:LOCAL_RANK (NCCL). Starts the process group on first use (torchrun's rendezvous environment) and
    ends it at exit; a later call reuses it."""
    launch = launched()
    if launch is None:
        return None
    check_rank_device(device, launch)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timeout_s()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            reason = " ".join(str(e).split())[:160]
            raise TaftError(f"rank {launch.rank} could not join the other ranks ({reason})") from e
        atexit.register(dist.destroy_process_group)
    elif dist.get_backend() != backend:
        raise TaftError(f"the process group uses {dist.get_backend()}, but training on {device} needs {backend}")
    return Group(launch.rank, launch.world, timeout)


@contextlib.contextmanager
def sigterm_as_error() -> Iterator[Callable[[], None]]:
    """Under torchrun, SIGTERM in the body (torchrun stopping every rank once one has failed) raises a one-line
    `TaftError`, so that the rank says why it stopped and unwinds like any error (temporary files removed); one
    arriving while an error is being handled (the rank stopping on its own, e.g. a lost peer) is ignored, so that
    error is said. It yields `stopping()`, to call as the caller catches an error: SIGTERM is then ignored to the end
    of the body (the rank is returning anyway; a second line would only repeat it). The previous handler is back
    after the body. For the command line (the body includes printing the error line): a library does not own its
    process's signals."""
    launch = launched()
    if launch is None:
        yield lambda: None
        return

    def stopped(signum: int, frame: object) -> None:
        if sys.exc_info()[0] is not None:  # already stopping on an error of its own, which is being said
            return
        raise TaftError(f"rank {launch.rank} was stopped by torchrun (SIGTERM): another rank failed or the job was "
                        "cancelled (see its error)")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGTERM, previous)


def fault_point(rank: int, step: int) -> None:
    """Test hook (see the module doc); does nothing in normal use."""
    fault = os.environ.get(FAULT_ENV)
    if step != 2 or fault is None:
        return
    if fault == f"{rank}:exit":
        os._exit(FAULT_EXIT)
    if fault == f"{rank}:stall":
        time.sleep(3600)


class AllReduceStep(AutogradStep):
    """Plain training's step on this rank's part (b_r examples) of a global batch of B: the gradient of the
    part's mean loss (+ λ‖θ − θ0‖², as `AutogradStep`), weighted by b_r and summed over the ranks by one all_reduce
    together with the losses and sizes, then divided by B: Σ_r b_r ∇L_r / B, the gradient of the global batch's
    mean loss (the proximity term is in every ∇L_r, and the weights b_r / B sum to 1). Every rank then takes the
    same optimizer step. A rank with no example of a short last batch adds zeros. Returns the global batch's (loss
    sum, size), the same on every rank; a non-finite global loss raises `NonFiniteError` on every rank."""

    def __init__(self, classifier: Classifier, optimizer: torch.optim.Optimizer, config: TrainConfig,
                 group: Group, *, forward: Callable[..., torch.Tensor] | None = None, autocast: str = "none"):
        super().__init__(classifier, optimizer, config, forward=forward, autocast=autocast)
        self.group, self.taken = group, 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
        self.taken += 1
        fault_point(self.group.rank, self.taken)
        b = len(y)
        self.optimizer.zero_grad(set_to_none=True)
        value = 0.0
        if b:
            loss = self.loss(x, y, mask)
            value = float(loss.detach())  # checked once summed, so that every rank stops alike
            self.backward(loss)
        params = list(self.params.values())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        sizes = torch.tensor([value * b, b], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) * b for g in grads] + [sizes])
        self.group.all_reduce(flat, f"the gradient sum of step {self.taken}")
        total, count = float(flat[-2]), round(float(flat[-1]))
        if not math.isfinite(total):
            raise NonFiniteError("the batch loss", total / count)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).div(count)
            offset += p.numel()
        self.update()
        return total, count
