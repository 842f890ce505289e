"""Typed, frozen configs: what the CLI (flags + optional TOML) resolves to, and what manifests record."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

QUANTS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OVERFLOWS = ("truncate", "drop", "error")
SCHEDULES = ("cosine", "linear", "constant")


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
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, batch_size=4, epochs=1.0,
                                                                   eval_frac=0.1, eval_every=20))
    norm_data: str = ""  # demonstrations scored 0 on average; "" = the best-ranked responses of the training set
    max_len: int = 512
    overflow: str = "truncate"
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


def to_dict(cfg) -> dict:
    return asdict(cfg)
