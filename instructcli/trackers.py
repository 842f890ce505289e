"""--report-to: every metrics.jsonl row mirrored to experiment trackers (TensorBoard, W&B, trackio) under the
same names at the same step, with the resolved config as hyper-parameters and the run dir's name as the run's.

Opened once per run by the main process (loop.start_or_resume), fed and closed by console.Metrics. On --resume
each tracker continues its run: TensorBoard forgets what was logged after the checkpoint (as metrics.jsonl
does), W&B and trackio keep the steps they already hold; rows of metrics.jsonl a tracker lacks (one added on
resume, or rows a killed run never handed over) are logged to it first.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from instructcli import console, files, parallel
from instructcli.checks import TRACKERS, report_names
from instructcli.config import flat_dict
from instructcli.errors import InstructError

PROJECT = "instruct"  # the W&B (unless WANDB_PROJECT says) and trackio project
STATE = "trackers.json"  # in the run dir: the W&B and trackio runs that --resume continues
HPARAMS_TAG = "_hparams_/"  # TensorBoard's hparams plugin
NON_FINITE = ("nan", "inf", "-inf")


def flat_config(cfg) -> dict:
    """The resolved config with its groups (model, train) merged in, named as the flags are; scalar values."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in flat_dict(cfg).items()}


def numbers(row: dict) -> dict:
    """A metrics row's numeric fields but its step (every tracker's x axis)."""
    return {k: v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def stdout_to_stderr(quiet: bool):
    """trackio prints its notices on stdout, which holds the command's results (the run dir's path)."""
    with open(os.devnull, "w") if quiet else contextlib.nullcontext(sys.stderr) as sink, \
            contextlib.redirect_stdout(sink):
        yield


# ------------------------------------------------------------------------------------------- TensorBoard
class TensorBoard:
    """Event files in <run dir>/tensorboard/, so they move with the run dir's rename; flushed every row, as
    metrics.jsonl is, so a killed run's events reach its last checkpoint."""

    def __init__(self, work: Path, name: str, config: dict, start: int, resume: bool, state: dict, quiet: bool):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        logdir = work / "tensorboard"
        self.have = truncate_events(logdir, start) if resume else 0
        # purge_step: a TensorBoard already showing the stopped attempt drops its steps after the checkpoint too
        self.writer = SummaryWriter(str(logdir), purge_step=start + 1 if resume else None)
        self.hparams = hparams(config, {})  # (experiment, session start, session end); metrics: every scalar
        self.writer.file_writer.add_summary(self.hparams[1])
        self.writer.flush()

    def log(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, exit_code: int) -> None:
        if exit_code == 0:  # the hparams session ends as a success; a stopped or failed one stays open
            self.writer.file_writer.add_summary(self.hparams[2])
        self.writer.close()


def truncate_events(logdir: Path, start: int) -> int:
    """On resume, forget the events logged after step `start` (they are logged again) and the earlier attempts'
    hparams (written again), so each step is in the event files once. Returns the last step still there."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    last = 0
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        kept = []
        for raw in RawEventFileLoader(str(path)).Load():  # a record cut by a kill ends the file
            event = Event.FromString(raw)
            if event.step > start or any(v.tag.startswith(HPARAMS_TAG) for v in event.summary.value):
                continue
            kept.append(raw)
            last = max(last, event.step) if event.summary.value else last
        tmp = logdir / f".rewrite.tmp-{os.getpid()}"  # not an event file's name: TensorBoard never reads it
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for raw in kept:
                writer.write(raw)
            writer.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return last


# -------------------------------------------------------------------------------------------------- W&B
def wandb_mode() -> str:
    """WANDB_MODE when set; else online where W&B credentials are on this machine (WANDB_API_KEY or `wandb
    login`'s ~/.netrc entry), else offline: a run never stops to ask for a key, `wandb sync` uploads it later."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return "online" if netrc.netrc(os.environ.get("NETRC")).authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class WandB:
    """A W&B run in W&B's own dir (WANDB_DIR, else ./wandb), console capture off (stdout holds results)."""

    def __init__(self, work: Path, name: str, config: dict, start: int, resume: bool, state: dict, quiet: bool):
        import wandb

        mode = wandb_mode()
        if mode == "offline" and not os.environ.get("WANDB_MODE"):
            console.log("wandb: no W&B login on this machine, logging offline (`wandb sync` uploads the run; "
                        "WANDB_MODE sets the mode)")
        again = resume and "wandb" in state  # the same W&B run goes on; it ignores steps it already has
        settings = {"silent": quiet, **({} if os.environ.get("WANDB_CONSOLE") else {"console": "off"})}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or PROJECT, name=name, config=config,
                              id=state["wandb"] if again else None, resume="allow" if again else None, mode=mode,
                              dir=os.environ.get("WANDB_DIR") or None,  # read now: W&B reads its env once a process
                              settings=wandb.Settings(**settings))
        state["wandb"] = self.run.id
        self.have = start if again else 0

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


# ---------------------------------------------------------------------------------------------- trackio
class Trackio:
    """A run in trackio's local store (TRACKIO_DIR, else ~/.cache/huggingface/trackio), project `instruct`;
    its system-metrics threads off (peak memory is in every row)."""

    def __init__(self, work: Path, name: str, config: dict, start: int, resume: bool, state: dict, quiet: bool):
        import trackio

        self.quiet = quiet
        again = resume and "trackio" in state  # trackio finds the run by name; only one this run dir began
        with stdout_to_stderr(quiet):
            self.run = trackio.init(project=PROJECT, name=name, config=config, resume="allow" if again else "never",
                                    auto_log_cpu=False, auto_log_gpu=False)
        state["trackio"] = self.run.id
        self.have = self.last_step(name) if again else 0

    def last_step(self, name: str) -> int:
        """The last step trackio holds for this run (steps after the checkpoint are kept, not logged again)."""
        from trackio.sqlite_storage import SQLiteStorage

        return SQLiteStorage.get_last_step(PROJECT, name, run_id=self.run.id) or 0

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self, exit_code: int) -> None:
        import trackio

        with stdout_to_stderr(self.quiet):
            trackio.finish()  # the current run, ours; then trackio's exit hook has none left to finish again


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio}


# --------------------------------------------------------------------------------------------- all of them
class Trackers:
    """The run's open trackers: `log(row)` hands each a metrics row it does not hold yet, `close` ends them."""

    def __init__(self, opened: dict):
        self.opened = opened

    def log(self, row: dict) -> None:
        values, step = numbers(row), row.get("step")
        for t in self.opened.values():
            if step is not None and step > t.have:
                t.log(step, values)

    def close(self, exit_code: int = 0) -> None:
        opened, self.opened = self.opened, {}
        for name, t in opened.items():
            try:
                t.close(exit_code)
            except Exception as e:  # noqa: BLE001 - one tracker failing to close must not hide the run's result
                console.warn(f"--report-to {name}: closing failed: {type(e).__name__}: {e}")


def open_trackers(cfg, work: Path, name: str, metrics_path: Path, start: int) -> Trackers | None:
    """The trackers of cfg.report_to for the run in `work` (to be renamed to `name`), which starts after step
    `start`; under a launcher only the main process has them."""
    names = report_names(getattr(cfg, "report_to", ""))
    if not names or not parallel.main:
        return None
    state_path = work / STATE
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    config, opened = flat_config(cfg), {}
    try:
        for n in names:
            opened[n] = open_one(n, work, name, config, start, cfg.resume, state, cfg.quiet)
    except BaseException:
        Trackers(opened).close(1)
        raise
    if state:
        files.atomic_write_text(state_path, json.dumps(state) + "\n")
    trackers = Trackers(opened)
    replay(trackers, metrics_path, start)
    return trackers


def open_one(n: str, work: Path, name: str, config: dict, start: int, resume: bool, state: dict, quiet: bool):
    try:
        return KINDS[n](work, name, config, start, resume, state, quiet)
    except ImportError as e:  # installed but broken (find_spec found it at config time)
        raise InstructError(f"--report-to {n} needs the {TRACKERS[n]} package ({e}): pip install "
                            f"'instruct[{n}]'", 2) from None
    except InstructError:
        raise
    except Exception as e:  # noqa: BLE001 - a tracker's own failure (login, disk), in one line
        msg = (str(e).splitlines() or [""])[0]
        raise InstructError(f"--report-to {n}: could not start the run: {type(e).__name__}: {msg}", 1) from None


def replay(trackers: Trackers, metrics_path: Path, start: int) -> None:
    """The rows metrics.jsonl holds up to `start` that a tracker lacks (added on resume, or lost by a kill)."""
    if not metrics_path.is_file() or all(t.have >= start for t in trackers.opened.values()):
        return
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if row.get("step", 0) <= start:  # metrics.jsonl writes a non-finite number as its name
            trackers.log({k: float(v) if v in NON_FINITE else v for k, v in row.items()})
