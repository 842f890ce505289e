"""The one place that knows about other processes: data parallelism under `accelerate launch` or `torchrun`.

Every process holds the whole model (the frozen base, quantized or not, plus the adapters) and trains on its
own share of each step's examples. After the backward passes of a step, the gradients of the trainable
parameters are summed across processes with one all-reduce; each stage scales its losses by global
normalisers (tokens or examples of the whole step), so N processes with batch b take exactly the step that
one process takes with batch N*b. Adapters are small, so one coalesced all-reduce per optimizer step costs
little, and it works whatever the model is made of (one base shared by policy, value and reward in ppo,
8-bit or 4-bit weights) where a DDP wrapper would need every forward to go through it.

With one process every function here is the identity and torch.distributed is never touched.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from instructcli.errors import InstructError

rank, world, local_rank = 0, 1, 0
main = True  # the process that writes files, logs and progress


def init() -> None:
    """Join the process group when launched by accelerate/torchrun (WORLD_SIZE > 1); otherwise do nothing."""
    global rank, world, local_rank, main
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true"):
            raise InstructError(f"accelerate launch with {name}: not supported; instruct trains LoRA adapters "
                                "data-parallel (launch with --multi_gpu), see README 'More than one GPU'", 2)
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    # cpu=True when there is no GPU: accelerate then uses gloo (its default would be one process per machine).
    # A long timeout: the others wait in a barrier while the main process fills the caches (merging a 7B base
    # takes minutes; NCCL's default would kill them after 10)
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=2))
    rank, world, local_rank = state.process_index, state.num_processes, state.local_process_index
    main = state.is_main_process
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{local_rank}" if world > 1 else "cuda"
    return "cpu"


def times() -> str:
    """'x4 processes' for a log line under a launcher, '' otherwise."""
    return f"x{world} processes" if world > 1 else ""


def shard(items: list) -> list:
    """This process's contiguous share of a list whose length is a multiple of the process count (a step's
    examples); process 0 takes the first share, so the union in rank order is the list."""
    n = len(items) // world
    return items[rank * n:(rank + 1) * n] if world > 1 else items


def strided(items: list) -> list:
    """This process's share of a list of any length (evaluation sets): every world-th item."""
    return items[rank::world] if world > 1 else items


def _dist():
    import torch.distributed as dist

    return dist


def sum_all(*values: float) -> list[float]:
    """Sum each float over all processes (one all-reduce)."""
    if world == 1:
        return list(values)
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device())
    _dist().all_reduce(t)
    return t.tolist()


def mean(*values: float) -> list[float]:
    return [v / world for v in sum_all(*values)]


def any_process(flag: bool) -> bool:
    """True on every process if it is true on any (an interrupt, a non-finite batch): all take the same path."""
    return sum_all(float(flag))[0] > 0


def sum_tensor(t):
    """Sum a tensor over all processes (returns a new tensor; the identity with one process)."""
    if world == 1:
        return t
    t = t.clone()
    _dist().all_reduce(t)
    return t


def sync_grads(params: list, average: bool = False) -> None:
    """Sum (or average) the gradients of `params` over all processes, in one coalesced all-reduce. A parameter
    without a gradient on some process (an adapter its examples did not use) counts as zero there."""
    if world == 1:
        return
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    _dist().all_reduce(flat)
    if average:
        flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def broadcast_params(params: list) -> None:
    """Make every process start from process 0's trainable weights (random LoRA init, a loaded checkpoint)."""
    if world == 1:
        return
    import torch

    with torch.no_grad():
        for p in params:
            _dist().broadcast(p.data, 0)


def gather(items: list) -> list:
    """Every process's list, concatenated in rank order, on every process."""
    if world == 1:
        return items
    out = [None] * world
    _dist().all_gather_object(out, items)
    return [x for part in out for x in part]


def barrier() -> None:
    if world > 1:
        _dist().barrier()


def close(clean: bool = True) -> None:
    """Leave the process group (NCCL warns otherwise); a second call does nothing.

    After a clean run every process first waits for the others: one that tore down and exited early could cut
    a peer off in its last collective, and gloo then aborts that peer ("terminate called without an active
    exception"). After an error the process leaves at once (the others may never come), but still before the
    interpreter exits: gloo's worker threads outliving it abort the process too."""
    if world > 1 and _dist().is_initialized():
        if clean:
            barrier()
        _dist().destroy_process_group()


@contextmanager
def main_first():
    """The main process goes first (it fills caches: GGUF conversion, merged bases); the others then find them."""
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()
