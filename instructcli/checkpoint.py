"""A stage's run dir (built in `<out>.partial`, renamed into place when complete), its checkpoints, the RNG
state and seeding, the data order, and what a resumed run must keep equal."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from instructcli import __version__, console, files, parallel
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


SUMS = "files.json"  # a checkpoint's {file: [size, sha256]}, written last
CHECKPOINT_FILES = ("trainable.safetensors", "state.pt")


def file_sum(path: Path) -> list:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return [path.stat().st_size, h.hexdigest()]


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint dir, or None when its files have the sizes and checksums recorded at
    save (checkpoints from before the record are taken as they are)."""
    if not (ckpt / SUMS).is_file():
        return None if all((ckpt / f).is_file() for f in CHECKPOINT_FILES) else "files missing"
    try:
        sums = json.loads((ckpt / SUMS).read_text(encoding="utf-8"))
    except ValueError:
        return f"unreadable {SUMS}"
    for name, (size, digest) in sums.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} when written"
        if file_sum(f)[1] != digest:
            return f"{name} checksum differs from when it was written"
    return None


# settings a resumed run may change: how long it runs, how often it logs and saves, how it is shown (and to
# which trackers), and the micro-batching (the examples per step are checked on their own: check_resume)
RESUMABLE_CHANGES = {"max_steps", "epochs", "steps", "stop_kl", "stop_kl_temperature", "save_every", "keep_checkpoints", "log_every", "eval_every",
                     "quiet", "resume", "overwrite", "out", "batch_size", "grad_accum", "auto_batch_size",
                     "report_to"}
INPUTS = {"data", "prompts", "ptx_data", "norm_data", "reward", "policy", "model", "from_dir"}  # by content, not path


def identity(cfg, data: dict[str, tuple[str, str]], source) -> dict:
    """What a run means, for --resume to compare: the settings (less RESUMABLE_CHANGES), the sha256 of each
    input ({role: (path, digest)}: a moved file with the same content is the same input) and the model it
    trains on (the base's fingerprint and the run dirs on it)."""
    from instructcli import sources
    from instructcli.config import flat_dict

    base = "+".join([sources.fingerprint(source)] + [sources.dir_hash(d) for d in source.merged]
                    + ([sources.dir_hash(source.run_dir)] if source.run_dir else []))
    settings = {k: v for k, v in flat_dict(cfg).items() if k not in RESUMABLE_CHANGES | INPUTS}
    return json.loads(json.dumps({"settings": settings, "data": data, "base": base}))  # as a checkpoint holds it


def check_identity(had: dict | None, now: dict, step: int) -> None:
    """--resume continues only the run its checkpoint is from: a one-line diff of the first difference."""
    if not had:  # a checkpoint from before identities were recorded
        return
    for role, (path, digest) in now["data"].items():
        old = had["data"].get(role)
        if old is not None and old[1] != digest:
            was = "" if old[0] == path else f", at step {step} {old[0]}"
            raise InstructError(f"--resume: {path} changed since step {step} (sha256 {old[1][:8]}… → {digest[:8]}…"
                                f"{was}); start a new run or pass the original file", 2)
    if had.get("base") != now["base"]:
        raise InstructError(f"--resume: the base model changed since step {step} (fingerprint {had.get('base')} → "
                            f"{now['base']}); start a new run or pass the original model", 2)
    for k, v in now["settings"].items():
        if k in had["settings"] and had["settings"][k] != v:
            raise InstructError(f"--resume: --{k.replace('_', '-')} was {had['settings'][k]!r} at step {step}, now "
                                f"{v!r}; resume with the same settings (only length, logging and checkpointing "
                                "flags may change) or start a new run", 2)


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
        # one writer per run dir, from before the checks to the rename into place (under a launcher: the main)
        self.lock = files.Lock(self.out, make_parent=True) if parallel.main else None
        self.identity: dict | None = None  # what a resumed run must match (loop.start_or_resume sets it)
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
        weights = trainable_state(model)
        try:
            with files.atomic_dir(final, replace=True, tmp=self.ckpt_root / f".step-{step}.tmp") as tmp:
                save_file(weights, str(tmp / "trainable.safetensors"))
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rngs[0],
                    "rng_ranks": rngs,
                    "extra": {**extra, "identity": self.identity} if self.identity else extra,
                }
                torch.save(state, tmp / "state.pt")
                # sizes and checksums, so a damaged checkpoint (a full disk, a cut copy) is told from a good one
                files.atomic_write_text(tmp / SUMS, json.dumps({f: file_sum(tmp / f) for f in CHECKPOINT_FILES}))
        except OSError as e:
            needed = 3 * sum(t.numel() * t.element_size() for t in weights.values())  # weights + Adam's 2 moments
            raise (files.no_space(e, final, needed) or e) from None
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        parallel.barrier()
        return final

    def load_checkpoint(self, model, optimizer, scheduler) -> dict | None:
        """Restore the newest intact checkpoint (a damaged one is reported, set aside as `damaged-step-N`, and
        the one before it used); returns its state (step, extra) or None if there is none. Metric lines logged
        after it (or all of them, without one) are dropped: those steps run again."""
        from safetensors.torch import load_file

        ckpts = self.checkpoints()
        if not ckpts:
            if parallel.main:
                self.truncate_metrics(0)
            return None
        for last in reversed(ckpts):
            try:
                if why := damage(last):
                    raise ValueError(why)
                weights = load_file(str(last / "trainable.safetensors"))
                state = torch.load(last / "state.pt", weights_only=True)  # no pickle of arbitrary objects
                break
            except Exception as e:  # noqa: BLE001 - any unreadable file: the checkpoint is damaged
                console.warn(f"{last}: damaged checkpoint ({(str(e).splitlines() or [type(e).__name__])[0][:120]}); "
                             + ("using the one before it" if last != ckpts[0] else "no earlier one"))
                if parallel.main:  # set aside (kept for a look), so it is not taken again
                    aside = last.with_name(f"damaged-{last.name}")
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(last, aside)
        else:
            raise InstructError(f"--resume: no intact checkpoint in {self.ckpt_root} (every one is damaged); "
                                "start again with --overwrite", 1)
        if self.identity:  # before its weights are loaded: another model's shapes would fail less clearly
            check_identity(state["extra"].get("identity"), self.identity, state["step"])
        load_trainable_state(model, weights)
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
        try:
            model.save_pretrained(self.work, **({"selected_adapters": adapters} if adapters else {}))
            tokenizer.save_pretrained(self.work)
            manifest = {"format_version": FORMAT_VERSION, **manifest,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}
            files.atomic_write_text(self.work / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
        except OSError as e:  # the run dir stays .partial, its checkpoints intact: --resume finishes it
            needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            raise (files.no_space(e, self.work, needed) or e) from None
        files.replace_dir(self.work, self.out)
        if self.lock:
            self.lock.release()
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
