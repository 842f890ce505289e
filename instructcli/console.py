"""Everything a person watches: messages and rich progress bars on stderr, metrics.jsonl on disk (and, with
--report-to, in experiment trackers)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
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


# ------------------------------------------------------------------------------ other libraries' lines
# What the libraries would print on a normal run that tells our users nothing, each named by its own text
NOISE_WARNINGS = (
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),  # transformers 5, from peft's PeftModel()
    ("`torch.jit.script_method` is deprecated", DeprecationWarning),  # torch's mkldnn module, imported with bnb
    ("Setting `save_embedding_layers` to `True`", UserWarning),  # peft, saving an adapter on the embeddings
)
NOISY_LOGGERS = (
    "bitsandbytes.backends.cpu.ops",  # at import on AVX512-BF16 CPUs: an optional hub kernel it cannot fetch
    "bitsandbytes.autograd._functions",  # every 8-bit matmul of float32 inputs: "inputs will be cast to float16"
    "kernels",  # the package bnb fetches that kernel with: "Skipping publisher trust check ... offline mode"
)
QUIET_ENV = {  # read by each library when it is imported: no import here, so `instruct --help` stays instant
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' bars (loading, writing shards)
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",  # its advice and generation-config notes
}


def quiet_libraries() -> None:
    """Keep stderr to our own lines: library progress bars, advice and deprecation notes off (INSTRUCT_DEBUG=1
    skips this). A variable the user set keeps their value."""
    for message, category in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for var, value in QUIET_ENV.items():
        os.environ.setdefault(var, value)
    _quiet_imported()


def _quiet_imported() -> None:
    """The same for libraries already imported (by a caller of main): too late for the variables, so through
    their own switches, where the variable is ours (else they would warn that the user's setting wins)."""
    ours = {var for var, value in QUIET_ENV.items() if os.environ.get(var) == value}
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if "TRANSFORMERS_VERBOSITY" in ours:
            hf_logging.set_verbosity_error()
        if "HF_HUB_DISABLE_PROGRESS_BARS" in ours:
            hf_logging.disable_progress_bar()  # huggingface_hub's bars too
    if "datasets" in sys.modules and "HF_DATASETS_DISABLE_PROGRESS_BARS" in ours:
        import datasets

        datasets.disable_progress_bars()


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
    """Appends one JSON object per logged step to metrics.jsonl (flushed, so a crash keeps what was logged), and
    hands each row to the run's --report-to trackers (trackers.Trackers), closed with the file."""

    def __init__(self, path: Path, trackers=None):
        self.path = path
        self.f = open(path, "a", encoding="utf-8") if parallel.main else None  # one writer under a launcher
        self.trackers = trackers
        _open_metrics.append(self)

    def write(self, row: dict) -> None:
        if self.f is None:
            return
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()
        if self.trackers:
            self.trackers.log(row)

    def close(self, exit_code: int = 0) -> None:
        """`exit_code`: how the run ends (0 done, 128 + signal stopped, 1 failed), as the trackers record it."""
        if self in _open_metrics:
            _open_metrics.remove(self)
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.trackers:
            self.trackers, trackers = None, self.trackers
            trackers.close(exit_code)


_open_metrics: list[Metrics] = []  # closed by the CLI however a command ends (close_metrics)


def close_metrics(exit_code: int = 1) -> None:
    """The metrics files and trackers a failed run left open: closed, its trackers told it failed."""
    for m in list(_open_metrics):
        m.close(exit_code)


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
