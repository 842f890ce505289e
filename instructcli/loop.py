"""Training control the loops share, called where a reader sees it: start-or-resume, the guarded optimizer
step, checkpoint-or-stop; Ctrl-C, non-finite steps and out-of-memory handling; micro-batches."""

from __future__ import annotations

import contextlib
import math
import signal
import threading

import torch

from instructcli import checkpoint, console, parallel, rlhf, trackers
from instructcli.console import warn
from instructcli.errors import InstructError

MAX_BAD_STEPS = 5  # non-finite steps in a row before a run gives up


def schedule(t, optimizer, examples: int):
    """A TrainConfig run over `examples` training items: (items per optimizer step over all processes, total
    steps, the learning-rate scheduler: linear warmup, then t.schedule)."""
    per_step = t.batch_size * t.grad_accum * parallel.world  # --batch-size is per process
    total = t.max_steps or max(1, math.ceil(t.epochs * math.ceil(examples / per_step)))
    warmup = int(t.warmup * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: rlhf.lr_lambda(s, total, warmup, t.schedule))
    return per_step, total, scheduler


def start_or_resume(run: checkpoint.RunDir, model, optimizer, scheduler, params: list, resume: bool, seed: int,
                    per_step: int, identity: dict, what: str = "examples",
                    config=None) -> tuple[int, dict | None, console.Metrics]:
    """With --resume, restore the newest intact checkpoint, which must be of the same run (`identity`: its
    data, base and settings; checkpoint.identity); then every process starts from the same weights (and,
    fresh, its own random streams), and the run dir is created. Returns (the first step, the checkpoint's
    state or None, the run's metrics.jsonl writer, which also feeds the trackers of `config`'s --report-to)."""
    state = None
    run.identity = identity
    if resume and (state := run.load_checkpoint(model, optimizer, scheduler)):
        checkpoint.check_resume(state["extra"], per_step, what)
        console.log(f"resumed from step {state['step']}")
    parallel.broadcast_params(params)
    if parallel.world > 1 and not state:  # own dropout masks and samples per process
        checkpoint.seed_everything(seed + parallel.rank)
    run.create()
    start = state["step"] if state else 0
    report = trackers.open_trackers(config, run.work, run.out.name, run.metrics_path, start) if config else None
    return start, state, console.Metrics(run.metrics_path, report)


def step_controls(run: checkpoint.RunDir, t, state: dict | None) -> tuple["NonFiniteGuard", "MicroBatches"]:
    """A TrainConfig loop's guard against non-finite steps (pointing at the run's checkpoints) and its
    micro-batches (at the size a resumed run had reached)."""
    return (NonFiniteGuard(f"last good checkpoint in {run.ckpt_root}"),
            MicroBatches(t.batch_size, t.auto_batch_size, t.grad_accum, state))


def optimizer_step(guard: "NonFiniteGuard", step: int, loss: float, grad_norm: float, optimizer,
                   scheduler) -> float | None:
    """Apply the step's (clipped) gradients, unless its loss or gradient norm is not finite: then they are
    dropped (NonFiniteGuard). Returns the learning rate the step used, or None when it was skipped."""
    if not guard.ok(step, loss, grad_norm, optimizer):
        return None
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def checkpoint_or_stop(run: checkpoint.RunDir, done: int, total: int, interrupt: "Interrupt", save_every: int,
                       keep: int, model, optimizer, scheduler, extra: dict, metrics: console.Metrics) -> None:
    """After step `done` of `total`: a checkpoint every `save_every` steps, and one when Ctrl-C asked to stop
    (every process stops at the same step), which then ends the run with the resume hint."""
    stop = parallel.any_process(interrupt.requested)
    if done >= total:
        return
    if (save_every and done % save_every == 0) or stop:
        run.save_checkpoint(done, model, optimizer, scheduler, extra, keep)
    if stop:
        signum = interrupt.signum or signal.SIGINT  # another process was signalled: as Ctrl-C
        metrics.close(128 + signum)
        console.stopped(done)
        raise Stopped(signum)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal: the CLI exits 128 + signum (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__()
        self.signum = int(signum)


@contextlib.contextmanager
def stop_at_once():
    """SIGTERM and SIGHUP stop at once, as Ctrl-C does (exit 143 / 129): for commands whose every answer is
    already on disk when it is made (label)."""
    def handle(signum, frame):
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Interrupt:
    """The first Ctrl-C, SIGTERM (docker stop, Kubernetes, Slurm preemption, `timeout`) or SIGHUP (a closed
    terminal) sets `requested`, so the loop finishes its step, writes a checkpoint and stops (exit 128 +
    signum); a second signal stops at once."""

    def __init__(self):
        self.requested, self.signum = False, None
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            self._restore()
            raise Stopped(signum)
        self.requested, self.signum = True, signum
        warn(f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint (a second signal "
             "stops at once)")

    def _restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


class NonFiniteGuard:
    """Skips a step whose loss or gradient norm is NaN/inf, so it never reaches the weights or a checkpoint;
    gives up after `limit` such steps in a row."""

    def __init__(self, hint: str = "", limit: int = MAX_BAD_STEPS):
        self.limit, self.hint, self.in_a_row = limit, hint, 0

    def ok(self, step: int, loss: float, grad_norm: float, optimizer) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.in_a_row += 1
        warn(f"step {step}: non-finite loss or gradient ({loss}, {grad_norm}); skipped")
        if self.in_a_row >= self.limit:
            raise InstructError(f"{self.in_a_row} non-finite steps in a row; lower --lr or check the data"
                                + (f" ({self.hint})" if self.hint else ""), 1)
        return False


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError when malloc fails."""
    msg = str(e).lower()
    cuda_oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch < 2.5
    return isinstance(e, cuda_oom) or (
        isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg))


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OutOfMemory:
    """`with OutOfMemory(lambda: "what ran and what to try"):` turns an out-of-memory error inside into a
    one-line error (exit 1) built when it happens, so it can name the step and sizes that failed."""

    def __init__(self, describe):
        self.describe = describe

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and is_oom(exc):
            free_memory()
            raise InstructError(f"out of memory {self.describe()}", 1) from None
        return False


class MicroBatches:
    """Runs one optimizer step's examples in micro-batches of `size`. Out of memory: with `auto`, the step's
    gradients are dropped, the micro-batch is halved and the same step runs again (same examples, same
    loss weighting, so the same update); without it, a one-line error says what failed and what to try."""

    def __init__(self, size: int, auto: bool, grad_accum: int = 1, state: dict | None = None):
        self.size, self.auto, self.grad_accum, self.requested = size, auto, grad_accum, size
        if state:  # a micro-batch halved before the checkpoint stays halved: the same run, resumed
            self.size = state["extra"].get("micro_batch", size)

    def run(self, step: int, examples: list, fn, optimizer) -> list:
        """fn(chunk, weight) for each chunk, weight = its share of the step's examples; returns fn's results."""
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        while True:
            torch.set_rng_state(rng[0])  # a retry draws the same dropout masks as a run that never failed
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
            try:
                return [fn(examples[i:i + self.size], len(examples[i:i + self.size]) / len(examples))
                        for i in range(0, len(examples), self.size)]
            except RuntimeError as e:
                if not is_oom(e):
                    raise
                optimizer.zero_grad(set_to_none=True)
                free_memory()
                if not self.auto or self.size == 1:
                    half = max(1, self.size // 2)
                    accum = -(-self.requested * self.grad_accum // half)  # ceil: at least the same effective batch
                    raise InstructError(
                        f"out of memory at step {step} with micro-batches of {self.size} (--batch-size): try "
                        f"--batch-size {half} --grad-accum {accum} (same effective batch), --quant 8bit, a smaller "
                        f"--max-len{'' if self.auto else ', or --auto-batch-size'}", 1) from None
                self.size //= 2
                warn(f"step {step}: out of memory; retrying with micro-batches of {self.size}")
