"""Typed, frozen configs: what the CLI (flags + optional TOML) resolves to, and what manifests record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from instructcli.errors import InstructError

QUANTS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OVERFLOWS = ("truncate", "drop", "error")
SCHEDULES = ("cosine", "linear", "constant")
OLD_LOGPROBS = ("auto", "rollout", "recompute")
POOLS = ("last", "mean")  # what the reward model's head reads (models.score_features)


def check_choice(flag: str, value, choices) -> None:
    """The one-line error (exit 2) for a value outside a flag's choices, from the CLI or a config built in Python."""
    if value not in choices:
        raise InstructError(f"--{flag}: expected one of {' | '.join(choices)}, got {value!r}", 2)


def check_sampling(temperature: float, top_p: float, zero_ok: bool = True) -> None:
    """Sampling settings that yield a distribution (top-p 0 keeps no token: NaN probabilities)."""
    if temperature < 0 or (temperature == 0 and not zero_ok) or not 0 < top_p <= 1:
        raise InstructError(f"--temperature must be {'>=' if zero_ok else '>'} 0 and --top-p in (0, 1], got "
                            f"{temperature} and {top_p}", 2)


def check_reading(pool: str, score_depth: float) -> None:
    """What a reward model's head reads (--pool, --score-depth), from the CLI or a config built in Python."""
    check_choice("pool", pool, POOLS)
    if not 0 < score_depth <= 1:
        raise InstructError(f"--score-depth: must be in (0, 1], got {score_depth}", 2)


@dataclass(frozen=True)
class ModelConfig:
    model: str = "default"  # "default" (embedded SmolLM2-135M-Instruct), hub id, local dir, .gguf file or a run dir
    quant: str = "none"  # none | 8bit | 4bit (bitsandbytes), applied to the frozen base
    dtype: str = "auto"  # auto = bfloat16 on a CUDA GPU that supports it, else float32
    full: bool = False  # full fine-tuning instead of LoRA (needs quant none)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"  # comma-separated module names, or all-linear
    lora_layers: int = 0  # adapt only the top N decoder layers (0 = all): the frozen layers below need no backward
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    max_steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup: float = 0.05  # fraction of total steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8  # micro-batch
    grad_accum: int = 1
    auto_batch_size: bool = False  # halve the micro-batch on out-of-memory (same effective batch)
    eval_frac: float = 0.05  # held-out share of the rows (0 = no eval)
    eval_every: int = 50  # steps; the end of training always evaluates
    save_every: int = 100  # steps between resumable checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0


@dataclass(frozen=True)
class SFTConfig:
    data: str
    out: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    max_len: int = 512
    overflow: str = "truncate"
    skip_invalid: bool = False
    overwrite: bool = False
    resume: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class RMConfig:
    data: str
    out: str
    model: ModelConfig = field(default_factory=ModelConfig)  # model.model = the --from run dir or --model
    # the defaults are what bench/align.py found on the embedded model (ALIGNMENT.md)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, batch_size=4, epochs=2.0,
                                                                   eval_frac=0.1, eval_every=20))
    norm_data: str = ""  # demonstrations scored 0 on average; "" = the best-ranked responses of the training set
    pool: str = "mean"  # the head reads: last = the end-of-turn token's hidden state; mean = that and the response's mean
    head_lr: float = 1e-2  # the score head's learning rate; 0 = --lr
    score_depth: float = 0.5  # the head reads the hidden states after this share of the decoder layers (1 = all)
    max_len: int = 512
    overflow: str = "truncate"
    skip_invalid: bool = False
    overwrite: bool = False
    resume: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class PPOConfig:
    policy: str  # sft run dir (merged into the shared base; the reference is that base, adapters off)
    reward: str  # rm run dir trained --from the same sft run, or path/rule.py:function
    prompts: str
    out: str
    # quant, dtype and LoRA shape of the policy/value; no dropout: old and new log-probs come from one function
    model: ModelConfig = field(default_factory=lambda: ModelConfig(lora_dropout=0.0))
    ptx_data: str = ""  # pretraining rows for PPO-ptx
    ptx_coef: float = 27.8  # gamma, on the per-token KL(pi_SFT || pi) over the ptx text; 0 = plain PPO
    ptx_batch_size: int = 4
    kl: float = 0.02  # beta (initial value with target_kl)
    target_kl: float = 0.0  # > 0: adaptive controller toward this KL (nats per response)
    horizon: int = 10000
    # the defaults are what bench/align.py found on the embedded model (ALIGNMENT.md)
    steps: int = 30  # PPO iterations (rollout + optimisation)
    rollout_batch_size: int = 8  # prompts per rollout
    mini_batch_size: int = 8
    ppo_epochs: int = 1
    lr: float = 3e-4
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    old_logprobs: str = "auto"  # rollout (from the sampling loop) | recompute (a full policy forward) | auto
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    max_prompt_len: int = 256
    max_len: int = 512  # ptx rows
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut off without EOS
    reward_clip: float = 0.0  # > 0: clip scores to [-c, c]
    save_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    skip_invalid: bool = False
    overwrite: bool = False
    resume: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class ScoreConfig:
    reward: str
    samples: str
    out: str
    quant: str = "none"
    dtype: str = "auto"
    batch_size: int = 16
    max_len: int = 1024
    skip_invalid: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class SampleConfig:
    prompts: str
    out: str
    model: ModelConfig = field(default_factory=ModelConfig)
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_prompt_len: int = 512
    batch_size: int = 8
    seed: int = 0
    skip_invalid: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class EvalConfig:
    out: str  # dir for summary.json and the per-row JSONL files
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: str = ""  # reward / KL / length / distinct-n on the model's answers
    reward: str = ""  # rm run dir scoring those answers
    ref: str = ""  # KL reference; "" = the model's parent (its run dir's adapter switched off)
    lm_data: str = ""  # plain text rows: held-out LM loss (the alignment tax)
    toxicity: str = ""  # prompts: continuations plain and with a respectful instruction, classifier-scored
    truthfulness: str = ""  # multiple-choice rows, scored by log-likelihood
    report: str = ""  # dir for report.md + PNG plots
    n: int = 1
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_prompt_len: int = 512
    max_len: int = 1024  # per lm-data row
    batch_size: int = 8
    bootstrap: int = 10000
    seed: int = 0
    skip_invalid: bool = False
    overwrite: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class CompareConfig:
    items: tuple[str, ...]  # model/run dirs or samples files; the first is the baseline
    judge: str  # rm:DIR | path/rule.py:function | human
    out: str  # per-prompt JSONL
    prompts: str = ""  # needed when an item is a model
    quant: str = "none"
    dtype: str = "auto"
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    max_prompt_len: int = 512
    batch_size: int = 8
    bootstrap: int = 10000
    seed: int = 0
    skip_invalid: bool = False
    quiet: bool = False


def to_dict(cfg) -> dict:
    return asdict(cfg)
