"""A stage's run dir (built in `<out>.partial`, renamed into place when complete), its checkpoints, the RNG
state and seeding, the data order, and what a resumed run must keep equal."""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from instructcli import __version__, files, parallel
from instructcli.errors import InstructError
from instructcli.sources import FORMAT_VERSION, MANIFEST


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise InstructError(f"checkpoint does not match the model (missing {missing[0]} ...)", 2)
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def versions() -> dict:
    import importlib.metadata as md

    out = {"instruct": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


class RunDir:
    """A stage's output dir, built in `<out>.partial` (metrics.jsonl and checkpoints/ live there while it
    runs) and renamed to `<out>` by `finish`, so `<out>` exists only when complete."""

    def __init__(self, out: str, overwrite: bool = False, resume: bool = False):
        self.out = Path(out)
        self.work = Path(str(self.out) + ".partial")
        if str(out) in ("", "-"):
            raise InstructError("-o: an output directory is required", 2)
        if self.out.exists() and not self.out.is_dir():
            raise InstructError(f"{out}: exists and is not a directory", 2)
        if resume:
            if not self.work.is_dir():
                why = "is complete" if self.out.is_dir() else "has no unfinished run"
                raise InstructError(f"--resume: {out} {why} (no {self.work.name} to resume)", 2)
        else:
            if self.out.is_dir() and any(self.out.iterdir()) and not overwrite:
                raise InstructError(f"{out}: not empty; pass --overwrite to replace it", 2)
            if self.work.is_dir():
                if not overwrite:
                    raise InstructError(f"{self.work}: an interrupted run is there; --resume to continue it or "
                                        "--overwrite to start again", 2)
        # an interrupted run's leftovers are wiped by create(), once the input is known good
        self.wipe = not resume and overwrite and self.work.is_dir()
        self.metrics_path = self.work / "metrics.jsonl"

    def create(self) -> None:
        """Called once the input is known good: nothing is written for bad input. Under a launcher only the
        main process writes (here and below); the barriers keep the others from racing it."""
        parallel.barrier()  # every process has checked the dir before it changes
        if parallel.main:
            if self.wipe:
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True, exist_ok=True)
        parallel.barrier()

    # checkpoints -------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.work / "checkpoints"

    def checkpoints(self) -> list[Path]:
        if not self.ckpt_root.is_dir():
            return []
        steps = [p for p in self.ckpt_root.iterdir() if p.name.startswith("step-") and (p / "state.pt").is_file()]
        return sorted(steps, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int, model, optimizer, scheduler, extra: dict, keep: int) -> Path:
        """Weights, optimizer, scheduler, RNG and loop position, written to a temp dir and renamed."""
        from safetensors.torch import save_file

        final = self.ckpt_root / f"step-{step}"
        rngs = parallel.gather([rng_state()])  # each process's random streams, so each resumes its own
        if not parallel.main:
            parallel.barrier()
            return final
        with files.atomic_dir(final, replace=True, tmp=self.ckpt_root / f".step-{step}.tmp") as tmp:
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rngs[0],
                "rng_ranks": rngs,
                "extra": extra,
            }
            torch.save(state, tmp / "state.pt")
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        parallel.barrier()
        return final

    def load_checkpoint(self, model, optimizer, scheduler) -> dict | None:
        """Restore the newest complete checkpoint; returns its state (step, extra) or None if there is none.
        Metric lines logged after it (or all of them, without one) are dropped: those steps run again."""
        from safetensors.torch import load_file

        ckpts = self.checkpoints()
        if not ckpts:
            if parallel.main:
                self.truncate_metrics(0)
            return None
        last = ckpts[-1]
        try:
            load_trainable_state(model, load_file(str(last / "trainable.safetensors")))
            state = torch.load(last / "state.pt", weights_only=True)  # no pickle of arbitrary objects
        except InstructError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InstructError(f"{last}: unreadable checkpoint: {e}", 1) from None
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError) as e:
            raise InstructError(f"{last}: the checkpoint does not fit this model ({e}); was it written by an older "
                                "instruct? Start again with --overwrite", 2) from None
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == parallel.world:
            set_rng_state(ranks[parallel.rank])
        else:  # resumed with another process count: the data order goes on exactly; random streams restart
            set_rng_state(ranks[0])
            if parallel.rank:
                seed_everything(state["step"] * 1_000_003 + parallel.rank)
        if parallel.main:
            self.truncate_metrics(state["step"])
        return state

    def truncate_metrics(self, step: int) -> None:
        """On resume, forget metric lines logged after the checkpoint (they will be logged again)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                pass  # a line cut by a crash
        self.metrics_path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    # the end ------------------------------------------------------------------------------------
    def finish(self, model, tokenizer, manifest: dict, adapters: list[str] | None = None) -> Path:
        """Write the final weights, tokenizer and manifest into the work dir, then rename it into place.
        `adapters`: which of a multi-adapter model's adapters to save (the first becomes the run's own)."""
        if not parallel.main:
            parallel.barrier()  # returns once the main process has put the dir in place
            return self.out
        model.save_pretrained(self.work, **({"selected_adapters": adapters} if adapters else {}))
        tokenizer.save_pretrained(self.work)
        manifest = {"format_version": FORMAT_VERSION, **manifest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "versions": versions()}
        files.atomic_write_text(self.work / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        files.replace_dir(self.work, self.out)
        parallel.barrier()
        return self.out


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's own device only: a resume may see fewer or other GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible device's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class EpochOrder:
    """A fixed shuffle per epoch, so the k-th example drawn is a pure function of (seed, k): resuming at a
    step needs no saved data-loader state."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.perms = n, seed, {}

    def __getitem__(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        if epoch not in self.perms:
            g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self.perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self.perms[epoch][pos]


def check_resume(extra: dict, per_step: int, what: str = "examples") -> None:
    """A resumed run must take as many examples per step as the checkpointed one (batch size x grad accum x
    processes: the process count may change), or the data order would not go on where it stopped."""
    had = extra.get(f"{what}_per_step")
    if had is not None and had != per_step:
        raise InstructError(f"--resume: the checkpoint's steps took {had} {what} (batch size x grad accum x "
                            f"processes), this run's take {per_step}; keep the product equal", 2)
