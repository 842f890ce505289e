"""Everything a person watches: messages and rich progress bars on stderr, metrics.jsonl on disk."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from instructcli import parallel

_err = Console(stderr=True, highlight=False)
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(msg: str) -> None:
    """A progress/info line on stderr (stdout is for results)."""
    if not _quiet and parallel.main:  # under a launcher only the main process talks
        _err.print(msg, markup=False, soft_wrap=True)


def warn(msg: str) -> None:
    if parallel.main:
        _err.print(f"warning: {msg}", markup=False, style="yellow", soft_wrap=True)


def stopped(step: int) -> None:
    """After Ctrl-C: where the run stopped and how to go on (shown even with --quiet)."""
    if parallel.main:
        _err.print(f"stopped at step {step} with a checkpoint; continue with the same command plus --resume",
                   markup=False, style="yellow", soft_wrap=True)


def error(msg: str) -> None:
    where = "" if parallel.main else f"[process {parallel.rank}] "  # a failure in one process only must show
    _err.print(f"{where}error: {msg}", markup=False, style="bold red", soft_wrap=True)


def table(t) -> None:
    """A rich table on stderr (results for people; the JSON for programs goes to stdout)."""
    if not _quiet and parallel.main:
        _err.print(t, width=max(_err.width, 120))  # piped stderr is 80 wide: room for model paths


class Bar:
    """A rich progress bar with ETA and a live text field; silent when stderr is not a TTY or --quiet."""

    def __init__(self, total: int, description: str, completed: int = 0):
        self.enabled = not _quiet and parallel.main and _err.is_terminal
        self.progress = None
        if self.enabled:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), console=_err, transient=False)
            self.task = self.progress.add_task(description, total=total, completed=completed, info="")

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def update(self, advance: int = 1, info: str | None = None) -> None:
        if self.progress:
            kw = {"info": info} if info is not None else {}
            self.progress.update(self.task, advance=advance, **kw)

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()
        return False


class Metrics:
    """Appends one JSON object per logged step to metrics.jsonl (flushed, so a crash keeps what was logged)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", encoding="utf-8") if parallel.main else None  # one writer under a launcher

    def write(self, row: dict) -> None:
        if self.f is None:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def peak_memory_mb() -> float:
    """Peak CUDA memory if a GPU is in use, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20
    except ImportError:  # Windows
        import psutil

        return psutil.Process(os.getpid()).memory_info().peak_wset / 2**20


def fmt(x: float) -> str:
    return f"{x:.4g}"


class Interrupt:
    """First Ctrl-C sets `requested` so the loop can finish its step and checkpoint; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        warn("interrupted: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class NonFiniteGuard:
    """Skips a step whose loss or gradient norm is NaN/inf, so it never reaches the weights or a checkpoint;
    gives up after `limit` such steps in a row."""

    def __init__(self, limit: int = 5, hint: str = ""):
        self.limit, self.hint, self.in_a_row = limit, hint, 0

    def ok(self, step: int, loss: float, grad_norm: float, optimizer) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        optimizer.zero_grad(set_to_none=True)
        self.in_a_row += 1
        warn(f"step {step}: non-finite loss or gradient ({loss}, {grad_norm}); skipped")
        if self.in_a_row >= self.limit:
            from instructcli.errors import InstructError

            raise InstructError(f"{self.in_a_row} non-finite steps in a row; lower --lr or check the data"
                                + (f" ({self.hint})" if self.hint else ""), 1)
        return False


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError when malloc fails."""
    import torch

    msg = str(e).lower()
    cuda_oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch < 2.5
    return isinstance(e, cuda_oom) or (
        isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg))


def free_memory() -> None:
    import gc

    import torch

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
            from instructcli.errors import InstructError

            free_memory()
            raise InstructError(f"out of memory {self.describe()}", 1) from None
        return False


class MicroBatches:
    """Runs one optimizer step's examples in micro-batches of `size`. Out of memory: with `auto`, the step's
    gradients are dropped, the micro-batch is halved and the same step runs again (same examples, same
    loss weighting, so the same update); without it, a one-line error says what failed and what to try."""

    def __init__(self, size: int, auto: bool, grad_accum: int = 1):
        self.size, self.auto, self.grad_accum, self.requested = size, auto, grad_accum, size

    def run(self, step: int, examples: list, fn, optimizer) -> list:
        """fn(chunk, weight) for each chunk, weight = its share of the step's examples; returns fn's results."""
        import torch

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
                    from instructcli.errors import InstructError

                    half = max(1, self.size // 2)
                    accum = -(-self.requested * self.grad_accum // half)  # ceil: at least the same effective batch
                    raise InstructError(
                        f"out of memory at step {step} with micro-batches of {self.size} (--batch-size): try "
                        f"--batch-size {half} --grad-accum {accum} (same effective batch), --quant 8bit, a smaller "
                        f"--max-len{'' if self.auto else ', or --auto-batch-size'}", 1) from None
                self.size //= 2
                warn(f"step {step}: out of memory; retrying with micro-batches of {self.size}")


# ------------------------------------------------------------------------------------------------ plots
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        from instructcli.errors import InstructError

        raise InstructError("--report needs matplotlib: pip install 'instruct[eval]'", 2) from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(path: Path, series: dict[str, list[float]], title: str, xlabel: str) -> None:
    """Overlaid histograms on shared bins, one per named series, with each mean marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    values = [v for vs in series.values() for v in vs]
    lo, hi = min(values), max(values)
    bins = [lo + (hi - lo) * i / 24 for i in range(25)] if hi > lo else 10
    for (name, vs), color in zip(series.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        ax.hist(vs, bins=bins, alpha=0.55, color=color, label=f"{name} (n={len(vs)})")
        ax.axvline(sum(vs) / len(vs), color=color, linestyle="--", linewidth=1.5)
    ax.set(title=title, xlabel=xlabel, ylabel="count")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: Path, rows: list[dict], keys: list[str], title: str) -> None:
    """One panel per metrics.jsonl key against step: the raw values and a moving average."""
    plt = _pyplot()
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, linewidth=1)
        w = max(1, len(ys) // 10)
        if w > 1:
            avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, avg, color="tab:blue", linewidth=2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(path: Path, labels: list[str], values: list[float], cis: list[tuple[float, float]], title: str,
              ylabel: str) -> None:
    """Bars with 95 % confidence intervals as error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(labels), 3.4))
    err = [[v - lo for v, (lo, _) in zip(values, cis)], [hi - v for v, (_, hi) in zip(values, cis)]]
    ax.bar(labels, values, yerr=err, capsize=6, color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(labels)])
    ax.set(title=title, ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
