"""Data-parallel training of one embedding: the processes that torchrun or accelerate launch start.

``torchrun --nproc-per-node N -m tistudio train ...`` and ``accelerate launch -m tistudio train ...`` start N copies
of the same command with RANK, WORLD_SIZE and LOCAL_RANK in their environment. Each process loads the model on its
own device (cuda:LOCAL_RANK, or the CPU with the gloo backend) and computes its part of every micro-batch; the one
small gradient (the embedding's vectors) is averaged over the processes with one all-reduce per optimizer step,
which also carries the step's loss and whether any process was asked to stop, so every process takes the same
step and stops at the same one. Only process 0 writes files, previews, logs and the report.

What makes N processes give one process's vectors: every process draws the whole micro-batch of the step from the
generators seeded by (seed, step, micro) - ``batch_size * N`` samples, their prompts, timesteps and noise - and
computes its own slice of it; the mean of the N slices' losses is the whole batch's. So with the same global batch
(batch_size x processes x gradient_accumulation) N processes match one process within float rounding, and a run
resumes exactly on any number of processes that gives the same global micro-batch.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tistudio.errors import OptionError, TistudioError

log = logging.getLogger(__name__)


class PeerLost(TistudioError):
    """Another process of a data-parallel run failed or was stopped."""


@dataclass(frozen=True)
class Parallel:
    """Which of the run's processes this is. The default is the single process of an ordinary run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Parallel:
        """The process's place as torchrun and accelerate launch set it (RANK, WORLD_SIZE, LOCAL_RANK); a single
        process where they are absent."""
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls()
        values = {}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            text = environ.get(key, "0")
            if not text.isdigit():
                raise OptionError(
                    key,
                    text,
                    "a launcher sets it to a whole number; start tistudio with torchrun "
                    "or accelerate launch, or unset WORLD_SIZE",
                )
            values[key] = int(text)
        world, rank = values["WORLD_SIZE"], values["RANK"]
        if world < 1 or rank >= world:
            raise OptionError(
                "RANK",
                rank,
                f"it must be below WORLD_SIZE={world}; start tistudio with torchrun or "
                "accelerate launch, or unset WORLD_SIZE",
            )
        return cls(rank=rank, world=world, local_rank=values["LOCAL_RANK"])

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Process 0: the one that writes files and reports progress."""
        return self.rank == 0

    def device_choice(self, device: str) -> str:
        """The --device this process uses: with several processes and CUDA, its own GPU (cuda:LOCAL_RANK)."""
        if not self.active:
            return device
        if device == "mps":
            raise OptionError("device", device, "Apple Metal runs one process; train without torchrun or use the CPU")
        if device in ("auto", "cuda") and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise OptionError(
                    "LOCAL_RANK",
                    self.local_rank,
                    f"this machine has {torch.cuda.device_count()} GPUs; start at most that many processes per machine",
                )
            return f"cuda:{self.local_rank}"
        return "cpu" if device == "auto" else device

    def share(self, count: int) -> range:
        """The items of `count` (e.g. training photos) this process works on: every world-th from its rank."""
        return range(self.rank, count, self.world)

    def part(self, batch: int) -> slice:
        """This process's slice of a micro-batch of batch * world samples."""
        return slice(self.rank * batch, (self.rank + 1) * batch)

    # ------------------------------------------------------------------------------------------------------------
    # Collectives (each a no-op for a single process)

    def average_step(self, parameters: Sequence[torch.Tensor], loss: torch.Tensor, stop: bool) -> bool:
        """Average the parameters' gradients and the step's loss over the processes, in place, with one all-reduce;
        returns whether any process was asked to stop. A NaN anywhere makes every process's step non-finite."""
        if not self.active:
            return stop
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat(
            [
                *(g.detach().float().reshape(-1) for g in grads),
                loss.detach().float().reshape(1),
                torch.tensor([1.0 if stop else 0.0], device=loss.device),
            ]
        )
        self._all_reduce(flat)
        flat /= self.world
        offset = 0
        for parameter, grad in zip(parameters, grads, strict=True):
            size = grad.numel()
            parameter.grad = flat[offset : offset + size].view_as(grad).to(grad.dtype).clone()
            offset += size
        loss.copy_(flat[offset])
        return bool(flat[offset + 1] > 0)

    def agree(self, flag: bool, device: torch.device) -> bool:
        """Process 0's decision (e.g. that the loss converged), given to every process."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        self._collective(lambda: torch.distributed.broadcast(value, src=0))
        return bool(value.item() > 0)

    def smallest(self, value: int, device: torch.device) -> int:
        """The smallest of the processes' values (e.g. the batch size each GPU can hold)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        self._collective(lambda: torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN))
        return int(tensor.item())

    def gather_shares(self, local: torch.Tensor, count: int) -> torch.Tensor:
        """Every process's rows for its share(count) items, reassembled in item order on every process. `local`
        holds this process's items along the first dimension."""
        if not self.active:
            return local
        rows = -(-count // self.world)
        padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        self._collective(lambda: torch.distributed.all_gather(pieces, padded))
        return torch.stack([pieces[i % self.world][i // self.world] for i in range(count)])

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        self._collective(lambda: torch.distributed.all_reduce(tensor))

    def barrier(self, device: torch.device) -> None:
        """Wait until every process has come this far."""
        if self.active:
            self._all_reduce(torch.zeros(1, device=device))

    def _collective(self, call: Callable[[], object]) -> None:
        try:
            call()
        except (RuntimeError, ConnectionError) as error:  # gloo and NCCL report a lost peer as these
            raise PeerLost(
                f"process {self.rank} of {self.world}: another process of this run stopped or failed "
                f"({short_reason(error)})"
            ) from error


def short_reason(error: BaseException) -> str:
    """The first sentence of a backend's error, without its source-file prefix ("[.../pair.cc:553] ...")."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0] if str(error).strip() else "")
    return (text.split(". ")[0].rstrip(".") or type(error).__name__)[:160]


@contextmanager
def process_group(parallel: Parallel, device: torch.device) -> Iterator[None]:
    """Join the run's processes (NCCL on CUDA, gloo otherwise) for the length of a job, where there are several
    and the caller has not joined them already; leave after."""
    import torch.distributed as dist

    if not parallel.active or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=parallel.rank, world_size=parallel.world)
    log.info("process %d of %d (%s, %s backend)", parallel.rank, parallel.world, device, backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
