"""The only place that loads, quantizes (--quant), adapts (LoRA) and exports models; the reward model and the
PPO models (policy, reference, reward and value on one shared base)."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from instructcli import batches, console, files, parallel
from instructcli.config import ModelConfig
from instructcli.errors import InstructError
from instructcli.forward import hidden_states, score_features
from instructcli.sources import (MANIFEST, Source, bitsandbytes_if_loaded, merged_base, normalisation,
                                 reward_reading, refuse_reward_model, require_rm, resolve, same_weights,
                                 has_adapter)


CHATML_TEMPLATE = (  # used only for tokenizers that ship no chat template of their own
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ------------------------------------------------------------------------------------------ loading
def pick_device() -> str:
    return parallel.device()  # "cuda:<local rank>" under a multi-GPU launcher


def torch_dtype(name: str, device: str):
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(source: Source, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

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
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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


def score_layers(depth: float, num_layers: int) -> int:
    """How many decoder layers a reward model read at `depth` (a share of the layers) runs; 0 = all."""
    return 0 if depth >= 1 else max(1, round(depth * num_layers))


def lora_config(mc: ModelConfig, model, read_depth: float = 1.0):
    """LoRA on mc's targets, in every layer, the top mc.lora_layers, or, for a reward model read at
    `read_depth` < 1, the layers below that depth: there is nothing to adapt above where the head reads."""
    with bitsandbytes_if_loaded():
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
    with bitsandbytes_if_loaded():
        from peft import get_peft_model

        try:
            return get_peft_model(model, lora_config(mc, model, read_depth))
        except ValueError as e:
            raise InstructError(f"--lora-targets {mc.lora_targets}: {e}", 2) from None


def inference_model(source: Source, mc: ModelConfig, device: str):
    """A model to sample from or evaluate: base with the run dir's adapter applied (no merge, so a quantized
    base stays quantized)."""
    refuse_reward_model(source)
    model = load_base(source, mc, device)
    if has_adapter(source):
        try:
            model = with_adapter(model, source.run_dir)
        except (OSError, ValueError) as e:
            raise InstructError(f"{source.run_dir}: cannot load adapter: {e}", 2) from None
    model.eval()
    return model


def with_adapter(base, run_dir: str, **kwargs):
    """PeftModel.from_pretrained (bitsandbytes left unimported for a base that does not use it)."""
    with bitsandbytes_if_loaded():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, run_dir, **kwargs)


# ------------------------------------------------------------------------------------------ export
def export_source(run_dir: str, out: str, log=None) -> tuple[Source, Path]:
    """The run dir to export and the output dir, both checked before any weight is loaded."""
    source = resolve(run_dir, log)
    if not source.run_dir:
        raise InstructError(f"{run_dir}: not an instruct run dir (no {MANIFEST})", 2)
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InstructError(f"{out}: exists and is not empty", 2)
    return source, target


def merged_model(source: Source, dtype: str = "float32"):
    """(model, tokenizer): the run dir's adapter merged into full-precision base weights, with no peft left."""
    model = inference_model(source, ModelConfig(quant="none", dtype=dtype), "cpu")
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model, load_tokenizer(source)


def export_merged(run_dir: str, out: str, dtype: str = "float32", log=None) -> Path:
    """A plain transformers model (adapter merged into full-precision base weights) that loads without peft."""
    source, target = export_source(run_dir, out, log)
    model, tok = merged_model(source, dtype)
    with files.atomic_dir(target) as tmp:  # an empty target dir is replaced
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def export_gguf(run_dir: str, out: str, outtype: str = "f16", log=None) -> list[Path]:
    """A dir holding `<run name>.<outtype>.gguf` (llama.cpp, ollama) and an ollama `Modelfile`; returns both."""
    from transformers import AutoConfig

    from instructcli import gguf_export, modelfile

    source, target = export_source(run_dir, out, log)
    tok = load_tokenizer(source)
    gguf_export.check_supported(AutoConfig.from_pretrained(source.base), tok)  # before the merge, not after
    model, _ = merged_model(source)
    name = gguf_export.file_name(source.run_dir, outtype)
    with files.atomic_dir(target) as tmp:  # an empty target dir is replaced
        counts = gguf_export.write_gguf(model, tok, tmp / name, outtype, Path(source.run_dir).resolve().name)
        (tmp / "Modelfile").write_text(modelfile.modelfile(tok, name, console.warn), encoding="utf-8")
    if log:
        log(f"export: {name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " tensors")
    return [target / name, target / "Modelfile"]


# ---------------------------------------------------------------------------------- reward model
SCORE_HEAD = "score_head.safetensors"


class RewardModel(torch.nn.Module):
    """A causal LM (with its LoRA adapter) read by a scalar head at the last token of each sequence (the
    response's end-of-turn token; see tokens.encode_responses): on its hidden state, and with pool "mean" also on
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
        hidden = hidden_states(self.lm, input_ids, attention_mask, layers=self.layers)
        return self.read(score_features(hidden.float(), attention_mask, starts, self.pool), attention_mask)

    def read(self, feats, attention_mask):
        """Raw scores from score_features' (B, T, F) features: the head at each row's last token."""
        from instructcli.rlhf import last_token_index

        rows = torch.arange(feats.size(0), device=feats.device)
        return self.head(feats[rows, last_token_index(attention_mask)]).squeeze(-1)

    def normalise(self, raw):
        """(raw score - fitted bias) x fitted scale."""
        return (raw - self.bias) * self.scale

    def score(self, input_ids, attention_mask, starts=None):
        """Normalised rewards."""
        return self.normalise(self.forward(input_ids, attention_mask, starts))

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


def load_reward_model(spec: str, mc: ModelConfig, device: str, log=None):
    """An RM run dir ready to score: (model in eval mode, tokenizer, manifest). Refuses other stages' dirs."""
    from safetensors.torch import load_file

    source = require_rm(resolve(spec, log))
    base = load_base(Source(source.spec, source.base, merged=source.merged), mc, device)
    lm = with_adapter(base, source.run_dir)
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
    `ended` says which responses ended on their own (None: all). Identical responses (text and ending) are
    scored once and share the score: on some CPUs two equal rows of one batch differ in the last bits by their
    position, which would turn a tie between two models' equal answers into a win."""
    from instructcli import tokens

    keys = list(zip(responses, ended if ended is not None else [True] * len(responses)))
    unique = list(dict.fromkeys(keys))
    enc = tokens.encode_responses(tok, messages, [r for r, _ in unique], max_len, "truncate", tokens.OverflowStats(),
                                  "", [e for _, e in unique])
    device = next(model.head.parameters()).device
    start = len(tokens.encode_prompt(tok, messages))
    scores: list[float] = []
    with torch.no_grad():
        for b in range(0, len(enc), batch_size):
            batch = batches.collate_sequences(enc[b:b + batch_size], tok.pad_token_id)
            starts = torch.full((len(enc[b:b + batch_size]),), start, device=device)
            scores += model.score(batch["input_ids"].to(device), batch["attention_mask"].to(device), starts).tolist()
    by_key = dict(zip(unique, scores))
    return [by_key[k] for k in keys]


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

    @contextlib.contextmanager
    def reference(self):
        """Forwards through the SFT model: the base with every adapter off. On the way out PEFT turns the
        adapters back on through set_adapter, which flips requires_grad off for all but the active one: the
        trainable set is restored after, as use() does, or a checkpoint taken next would leave out the value
        adapter and --resume would refuse it."""
        try:
            with self.lm.disable_adapter():
                yield
        finally:
            self._restore_trainable()

    def use(self, adapter: str) -> None:
        """Make `adapter` the one forwards go through. PEFT's set_adapter also flips requires_grad; the
        trainable set (policy + value) is restored, so optimizer and checkpoints see the same parameters."""
        if adapter == self._adapter:  # set_adapter walks every module: ~30 ms a call on a small model
            return
        self.lm.set_adapter(adapter)
        self._restore_trainable()
        self._adapter = adapter

    def _restore_trainable(self) -> None:
        """requires_grad on exactly the policy and value parameters, whatever PEFT last switched."""
        for p in self.lm.parameters():
            p.requires_grad_(False)
        for p in self._trainable:
            p.requires_grad_(True)


def ppo_models(policy: Source, reward_spec: str, mc: ModelConfig, device: str, log=None):
    """Build PPOModels from an sft run (`policy`, merged into the base) and an RM run dir trained --from the
    same sft run, or a rule judge (then the value adapter and head start fresh). Returns (models, RM Source|None)."""
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
    with bitsandbytes_if_loaded():
        lm = _ppo_adapters(base, rm_source, mc)
    if rm_source:
        reward = RewardModel(lm, hidden, pool, layers)
        reward.head.load_state_dict(load_file(str(Path(rm_source.run_dir) / SCORE_HEAD)))
        reward.bias, reward.scale = normalisation(rm_source.manifest)
        value_head.load_state_dict(reward.head.state_dict())
        with torch.no_grad():  # PPO's scores are the normalised ones, (raw - bias) x scale: so are the first values
            value_head.bias.sub_(reward.bias).mul_(reward.scale)
            value_head.weight.mul_(reward.scale)
    else:
        reward = None
        torch.nn.init.zeros_(value_head.weight)
        torch.nn.init.zeros_(value_head.bias)
    for n, p in lm.named_parameters():
        p.requires_grad_(f".{POLICY}." in n or f".{VALUE}." in n)
    if reward is not None:
        for p in reward.head.parameters():
            p.requires_grad_(False)
    nets = PPOModels(lm, reward, value_head, pool, layers).to(device)
    nets.use(POLICY)
    return nets, rm_source


def _ppo_adapters(base, rm_source: Source | None, mc: ModelConfig):
    """The adapters on the shared base, in this order (their random initialisation is part of a seeded run):
    reward and value (copies of the RM's) and a fresh policy; without an RM, fresh policy and value."""
    from peft import PeftModel, get_peft_model

    if rm_source:
        lm = PeftModel.from_pretrained(base, rm_source.run_dir, adapter_name=REWARD)
        lm.load_adapter(rm_source.run_dir, adapter_name=VALUE, is_trainable=True)
        lm.add_adapter(POLICY, lora_config(mc, base))
        return lm
    lm = get_peft_model(base, lora_config(mc, base))
    lm.add_adapter(VALUE, lora_config(mc, base))
    return lm
