"""Typed, frozen configs: the ONLY place an option's name, type, default and help live. The CLI's flags are
built from these fields (cli.py), a TOML --config sets their defaults, and manifests record them. Validation
runs once, in __post_init__, so a config built in Python is checked as one built from flags."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, replace
from typing import ClassVar

from instructcli.checks import (check_choice, check_eval_frac, check_hallucination_judge, check_positive,
                                check_report_to, check_sampling)
from instructcli.errors import InstructError

QUANTS = ("none", "8bit", "4bit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OVERFLOWS = ("truncate", "drop", "error")
SCHEDULES = ("cosine", "linear", "constant")
OLD_LOGPROBS = ("auto", "rollout", "recompute")
DECODES = ("auto", "static", "eager")
POOLS = ("last", "mean")  # what the reward model's head reads (forward.score_features)
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
EXPORT_FORMATS = ("hf", "gguf")
GGUF_OUTTYPES = ("f16", "bf16", "q8_0")  # what gguf_export writes the 2-D weights as


def opt(default=MISSING, help: str = "", flags: tuple[str, ...] = (), factory=MISSING):
    """A config field with its flag's help (and names, when not --field-name)."""
    meta = {"help": help, "flags": flags}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def arg():
    """A positional argument's field: its help is written with the command in cli.py."""
    return field(metadata={"arg": True})


SEED_HELP = "Random seed (runs are deterministic on CPU)."
QUANT_HELP = "Base weights: none | 8bit | 4bit (bitsandbytes)."
DECODE_HELP = ("How answers are decoded: static (a static KV cache, each step a replayed CUDA graph on CUDA), eager "
               "(the step-by-step loop), auto = static on CUDA, eager on CPU.")
DTYPE_HELP = "auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU, else fp32)."


# ------------------------------------------------------------------------------------ shared groups
@dataclass(frozen=True)
class ModelConfig:
    model: str = opt("default", "default (embedded SmolLM2-135M-Instruct), hub id (offline cache), local model dir, "
                     ".gguf file, or a run dir.", ("--model", "-m"))
    quant: str = opt("none", QUANT_HELP)
    dtype: str = opt("auto", DTYPE_HELP)
    full: bool = opt(False, "Full fine-tuning instead of LoRA.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / rank).")
    lora_dropout: float = opt(0.05, "LoRA dropout.")
    lora_targets: str = opt("all-linear", "Modules to adapt: all-linear, or names like q_proj,v_proj.")
    lora_layers: int = opt(0, "Adapt only the top N decoder layers (0 = all); the layers below then need no "
                           "backward pass.")
    trust_remote_code: bool = opt(False, "Allow a hub model's own Python code to run.")

    def __post_init__(self):
        check_choice("quant", self.quant, QUANTS)
        check_choice("dtype", self.dtype, DTYPES)
        if self.full and self.quant != "none":
            raise InstructError("--full needs --quant none (quantized weights cannot be trained)", 2)
        check_positive(self, "lora_r", "lora_alpha")


INFERENCE_ONLY = ("full", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers")  # no adapter trained


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = opt(1.0, "Passes over the training rows (ignored with --max-steps).")
    max_steps: int = opt(0, "Optimizer steps; 0 = use --epochs.")
    lr: float = opt(2e-4, "Peak learning rate.")
    schedule: str = opt("cosine", "cosine | linear | constant, after warmup.")
    warmup: float = opt(0.05, "Warmup as a fraction of the steps.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    batch_size: int = opt(8, "Examples per micro-batch.", ("--batch-size", "-b"))
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    auto_batch_size: bool = opt(False, "On out-of-memory, halve the micro-batch and retry the step (same "
                                "effective batch, same update).")
    eval_frac: float = opt(0.05, "Share of rows held out for eval loss (0 = none).")
    eval_every: int = opt(50, "Evaluate every N steps (and at the end).")
    save_every: int = opt(100, "Resumable checkpoint every N steps (0 = none).")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep.")
    log_every: int = opt(1, "Write metrics.jsonl every N steps.")
    seed: int = opt(0, SEED_HELP)

    def __post_init__(self):
        check_choice("schedule", self.schedule, SCHEDULES)
        check_positive(self, "batch_size", "grad_accum", "epochs", "lr")
        check_eval_frac(self.eval_frac)


OUT_HELP = "Output run dir."
RUN_HELP = {  # the run options every training stage has
    "skip_invalid": "Skip and count invalid rows instead of stopping.",
    "overwrite": "Replace a non-empty output dir.",
    "resume": "Continue an interrupted run from its checkpoint.",
    "quiet": "No progress bars or info lines.",
}
QUIET = ("--quiet", "-q")
OUT = ("--out", "-o")
PROMPTS = ("--prompts", "-p")


def _then(cls, self):
    """Run the __post_init__ further along the MRO, so every group's checks run."""
    nxt = getattr(super(cls, self), "__post_init__", None)
    if nxt:
        nxt()


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The run options of the training stages."""

    skip_invalid: bool = opt(False, RUN_HELP["skip_invalid"])
    overwrite: bool = opt(False, RUN_HELP["overwrite"])
    resume: bool = opt(False, RUN_HELP["resume"])
    quiet: bool = opt(False, RUN_HELP["quiet"], QUIET)
    report_to: str = opt("", "Also log every metrics.jsonl row to these trackers, comma-separated: tensorboard "
                         "(<out>/tensorboard), wandb (offline unless logged in or WANDB_MODE says), trackio (its "
                         "local store); each an extra: pip install 'instruct[NAME]'.")

    def __post_init__(self):
        check_report_to(self.report_to)


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """How the commands that read datasets read one (JSONL, CSV/TSV, parquet, JSON, arrow, save_to_disk, hub)."""

    split: str = opt("train", "The split to read from a hub dataset id or a save_to_disk DatasetDict.")
    columns: str = opt("", "Read the file's columns under our names: OURS=THEIRS,... (e.g. "
                       "prompt=instruction,response=output).")


@dataclass(frozen=True, kw_only=True)
class Weights:
    """How the commands that only read a model load its base."""

    quant: str = opt("none", QUANT_HELP)
    dtype: str = opt("auto", DTYPE_HELP)

    def __post_init__(self):
        check_choice("quant", self.quant, QUANTS)
        check_choice("dtype", self.dtype, DTYPES)
        _then(Weights, self)


@dataclass(frozen=True, kw_only=True)
class Generation:
    """Sampling of the commands that make a model answer prompts."""

    temperature: float = opt(0.7, "Sampling temperature; 0 = greedy.")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    max_new_tokens: int = opt(128, "Max tokens per response.")
    max_prompt_len: int = opt(512, "Longer prompts keep their last tokens.")
    batch_size: int = opt(8, "Prompts per generate call.", ("--batch-size", "-b"))
    decode: str = opt("auto", DECODE_HELP)
    seed: int = opt(0, SEED_HELP)
    skip_invalid: bool = opt(False, RUN_HELP["skip_invalid"])
    quiet: bool = opt(False, RUN_HELP["quiet"], QUIET)

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p)
        check_positive(self, "max_new_tokens", "max_prompt_len", "batch_size")
        check_choice("decode", self.decode, DECODES)
        _then(Generation, self)


BOOTSTRAP_HELP = "Bootstrap resamples for the 95 % confidence intervals."
HALLUCINATION_HELP = ("Closed-domain tasks {instruction, input, task}: the share of answers that make up "
                      "information not in the input, per task, by --hallucination-judge.")
HALLUCINATION_JUDGE_HELP = ("support (offline: an answer's names, numbers and content words looked up in its input), "
                            "human (the paper's yes/no question in the label UI, resumable), rm:DIR (made-up when "
                            "scored below 0, the RM's reference answers) or path/rule.py:fn (made-up when it "
                            "returns > 0.5).")
BIAS_HELP = ("CrowS-Pairs rows {sent_more, sent_less, bias_type} (its CSV as published) and/or Winogender-style "
             "rows {sentence with one {pronoun}, occupation} (or its templates.tsv): preferences by likelihood. Several "
             "files: comma-separated.")


# ------------------------------------------------------------------------------------------ stages
@dataclass(frozen=True, kw_only=True)
class SFTConfig(RunOptions, DataOptions):
    data: str = arg()
    out: str = opt("runs/sft", OUT_HELP, OUT)
    model: ModelConfig = opt(factory=ModelConfig)
    train: TrainConfig = opt(factory=TrainConfig)
    max_len: int = opt(512, "Max tokens per example (prompt + response).")
    overflow: str = opt("truncate", "Longer examples: truncate | drop | error.")
    def __post_init__(self):
        super().__post_init__()
        check_choice("overflow", self.overflow, OVERFLOWS)
        check_positive(self, "max_len")


@dataclass(frozen=True, kw_only=True)
class RMConfig(RunOptions, DataOptions):
    HELP: ClassVar[dict] = {  # the shared fields' help, as it reads for this stage
        "epochs": "Passes over the training prompts (the paper: 1).",
        "lr": "Peak learning rate (the adapter's).",
        "batch_size": "Prompts (each with all K responses) per micro-batch.",
        "eval_frac": "Share of prompts held out for accuracy (0 = none).",
    }
    CLI_SKIP: ClassVar[tuple] = ("full",)

    data: str = arg()
    out: str = opt("runs/rm", OUT_HELP, OUT)
    from_dir: str = opt("", "Start from this sft run dir (merged into the base), as the paper does.", ("--from",))
    model: ModelConfig = opt(factory=ModelConfig)  # model.model = the --from run dir or --model
    # the defaults are what bench/align.py found on the embedded model (ALIGNMENT.md)
    train: TrainConfig = opt(factory=lambda: TrainConfig(lr=5e-4, batch_size=4, epochs=2.0, eval_frac=0.1,
                                                         eval_every=20))
    max_len: int = opt(512, "Max tokens per prompt + response.")
    overflow: str = opt("truncate", "Longer examples: truncate | drop | error.")
    norm_data: str = opt("", "Demonstrations JSONL that should score 0 on average (default: the best-ranked "
                         "training responses).")
    pool: str = opt("mean", "What the score head reads: last (the end-of-turn token's hidden state) or mean (that "
                    "and the mean over the response's tokens).")
    head_lr: float = opt(1e-2, "Learning rate of the score head (0 = --lr).")
    score_depth: float = opt(0.5, "The head reads the hidden states after this share of the decoder layers "
                             "(1 = all); the layers above never run.")
    def __post_init__(self):
        super().__post_init__()
        check_choice("pool", self.pool, POOLS)
        if not 0 < self.score_depth <= 1:
            raise InstructError(f"--score-depth: must be in (0, 1], got {self.score_depth}", 2)
        check_choice("overflow", self.overflow, OVERFLOWS)
        check_positive(self, "max_len")
        if self.from_dir:  # --from names the model: the sft run the RM starts from
            if self.model.model not in ("default", self.from_dir):
                raise InstructError("give --from (an sft run dir) or --model, not both", 2)
            object.__setattr__(self, "model", replace(self.model, model=self.from_dir))


@dataclass(frozen=True, kw_only=True)
class PPOConfig(RunOptions, DataOptions):
    CLI_SKIP: ClassVar[tuple] = ("model", "full")  # --policy names the model

    policy: str = opt(help="The sft run dir to optimise (also the KL reference).")
    reward: str = opt(help="An rm run dir trained --from the same sft run, or path/rule.py:function (runs that "
                      "local Python file).")
    prompts: str = opt(help="Prompts JSONL for rollouts.", flags=PROMPTS)
    out: str = opt("runs/ppo", OUT_HELP, OUT)
    # quant, dtype and LoRA shape of the policy/value; no dropout: old and new log-probs come from one function
    model: ModelConfig = opt(factory=lambda: ModelConfig(lora_dropout=0.0))
    ptx_data: str = opt("", "Pretraining rows {text} for PPO-ptx.")
    ptx_coef: float = opt(27.8, "gamma: weight of the pretraining term, the per-token KL from the SFT model on "
                          "--ptx-data (paper 27.8; 0 = plain PPO).")
    ptx_batch_size: int = opt(4, "Pretraining rows per optimisation step.")
    kl: float = opt(0.02, "beta, the per-token KL penalty coefficient (paper 0.02).")
    target_kl: float = opt(0.0, "> 0: a KL budget (nats per response): beta rises above --kl while the rollouts' "
                           "KL is over it, and comes back down to --kl, never below (0 = beta fixed at --kl).")
    stop_kl: float = opt(8.0, "> 0: end the run once the KL to SFT (nats per response, at --stop-kl-temperature), "
                         "averaged over the last 3 steps' rollouts, reaches this budget; the policy that drew "
                         "those rollouts is saved (0 = run all --steps).")
    stop_kl_temperature: float = opt(0.7, "The temperature --stop-kl measures the KL at: that of sample, eval and "
                                     "compare (0.7), so the budget is in the units eval reports.")
    horizon: int = opt(10000, "With --target-kl: beta changes by up to 20 % per this many rollouts.")
    # the defaults are what bench/align.py found on the embedded model (ALIGNMENT.md)
    steps: int = opt(80, "At most this many PPO iterations (rollout + optimisation); --stop-kl usually ends "
                     "the run sooner (PPO-ptx's KL grows slower, so it needs more steps to reach it).")
    rollout_batch_size: int = opt(16, "Prompts per rollout.")
    mini_batch_size: int = opt(16, "Rollouts per optimizer step.")
    micro_batch_size: int = opt(8, "Rollouts per forward (scoring, reference and the update), at most "
                                "--mini-batch-size (0 = --mini-batch-size): a larger mini-batch accumulates its "
                                "gradient over several, the same update in less memory.")
    ppo_epochs: int = opt(1, "Passes over each rollout batch.")
    lr: float = opt(3e-4, "Learning rate (policy and value adapters).")
    schedule: str = opt("constant", "constant | linear | cosine: the learning rate over the run's optimizer "
                        "steps (linear and cosine decay it to 0, as cleanrl's anneal_lr).")
    cliprange: float = opt(0.2, "Policy ratio clip.")
    cliprange_value: float = opt(0.2, "Value clip around the rollout's values.")
    vf_coef: float = opt(0.1, "Value loss weight.")
    gamma: float = opt(1.0, "GAE discount.")
    lam: float = opt(0.95, "GAE lambda.")
    whiten: bool = opt(True, "Whiten advantages.")
    old_logprobs: str = opt("auto", "Where the rollout's log-probs come from: rollout (the sampling loop; no extra "
                            "forward), recompute (a full policy forward, as the update runs), auto = rollout on a "
                            "float32 base without --quant, else recompute.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.")
    temperature: float = opt(1.0, "Rollout sampling temperature.")
    top_p: float = opt(1.0, "Rollout nucleus sampling.")
    max_new_tokens: int = opt(48, "Max tokens per rollout response.")
    decode: str = opt("auto", DECODE_HELP)
    max_prompt_len: int = opt(256, "Longer prompts keep their end.")
    max_len: int = opt(512, "Max tokens per pretraining row.")
    missing_eos_penalty: float = opt(0.0, "Subtracted from the score of a response cut off without EOS.")
    reward_clip: float = opt(0.0, "> 0: clip scores to [-c, c].")
    save_every: int = opt(10, "Resumable checkpoint every N steps (0 = none).")
    keep_checkpoints: int = opt(2, "How many recent checkpoints to keep.")
    seed: int = opt(0, SEED_HELP)
    def __post_init__(self):
        super().__post_init__()
        if self.model.model == "default":  # the policy is the model the run trains on
            object.__setattr__(self, "model", replace(self.model, model=self.policy))
        if self.model.full:
            raise InstructError("ppo trains LoRA adapters on a shared frozen base; --full is not supported", 2)
        check_positive(self, "steps", "rollout_batch_size", "mini_batch_size", "ppo_epochs", "lr", "max_new_tokens")
        check_sampling(self.temperature, self.top_p, zero_ok=False)
        if self.kl < 0 or self.ptx_coef < 0 or self.stop_kl < 0 or self.micro_batch_size < 0:
            raise InstructError("--kl, --ptx-coef, --stop-kl and --micro-batch-size must be >= 0", 2)
        check_positive(self, "stop_kl_temperature")
        check_choice("old-logprobs", self.old_logprobs, OLD_LOGPROBS)
        check_choice("decode", self.decode, DECODES)
        check_choice("schedule", self.schedule, SCHEDULES)
        if self.rollout_batch_size % self.mini_batch_size:
            raise InstructError("--rollout-batch-size must be a multiple of --mini-batch-size", 2)
        if self.ptx_coef > 0 and not self.ptx_data:
            raise InstructError("--ptx-coef > 0 needs --ptx-data (pretraining rows); --ptx-coef 0 is plain PPO", 2)


# ------------------------------------------------------------------------------- using a model
@dataclass(frozen=True, kw_only=True)
class ScoreConfig(Weights):
    reward: str = arg()
    samples: str = arg()
    out: str = opt("-", "Scored samples JSONL; - = stdout.", OUT)
    batch_size: int = opt(16, "Responses per forward.", ("--batch-size", "-b"))
    max_len: int = opt(1024, "Max tokens per prompt + response (longer: end cut).")
    skip_invalid: bool = opt(False, RUN_HELP["skip_invalid"])
    quiet: bool = opt(False, RUN_HELP["quiet"], QUIET)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "batch_size", "max_len")


@dataclass(frozen=True, kw_only=True)
class LabelConfig:
    samples: str = arg()
    out: str = opt(help="Comparisons JSONL: appended to, resumed from.", flags=OUT)
    judge: str = opt("", "Rank without a person: rm:DIR, or path/rule.py:function (runs that local Python file) "
                     "scoring (prompt, response).")
    noise: float = opt(0.0, "With --judge: swap adjacent ranks with this probability, as simulated labelers do.")
    seed: int = opt(0, SEED_HELP)
    quant: str = opt("none", QUANT_HELP)

    def __post_init__(self):
        check_choice("quant", self.quant, QUANTS)
        if not 0 <= self.noise <= 1:
            raise InstructError(f"--noise: must be in [0, 1], got {self.noise}", 2)


@dataclass(frozen=True, kw_only=True)
class SampleConfig(Generation, DataOptions):
    CLI_SKIP: ClassVar[tuple] = INFERENCE_ONLY

    model: ModelConfig = opt(factory=ModelConfig)  # model.model is the positional MODEL
    prompts: str = opt("-", "Prompts JSONL; - = stdin.", PROMPTS)
    out: str = opt("-", "Samples JSONL to write; - = stdout.", OUT)
    n: int = opt(1, "Samples per prompt (K).", ("-n",))

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "n")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Generation, DataOptions):
    CLI_SKIP: ClassVar[tuple] = INFERENCE_ONLY
    HELP: ClassVar[dict] = {"batch_size": "Sequences per forward."}

    model: ModelConfig = opt(factory=ModelConfig)  # model.model is the positional MODEL
    prompts: str = opt("", "Prompts JSONL: the model answers them; length, distinct-n, KL to --ref, and reward "
                       "with --reward.", PROMPTS)
    reward: str = opt("", "An rm run dir scoring the answers to --prompts.")
    ref: str = opt("", "KL and alignment-tax reference; default: the run dir's parent (its adapter switched off, "
                   "e.g. the sft model under a ppo run).")
    lm_data: str = opt("", "Plain text rows {text}: held-out LM loss, the alignment tax.")
    toxicity: str = opt("", "Prompts JSONL: continuations plainly and after a respectful instruction, scored by an "
                        "offline classifier.")
    truthfulness: str = opt("", "Multiple-choice rows {question, choices, correct}: accuracy by log-likelihood.")
    hallucination: str = opt("", HALLUCINATION_HELP)
    hallucination_judge: str = opt("support", HALLUCINATION_JUDGE_HELP)
    hallucination_labels: str = opt("", "With --hallucination-judge human: the file the person's answers go to "
                                    "(resumable); default <out>.hallucination-labels.jsonl.")
    bias: str = opt("", BIAS_HELP)
    report: str = opt("", "Dir for report.md with PNG plots (reward, KL, toxicity, hallucination, bias, training "
                      "curves).")
    out: str = opt("", "Dir for summary.json and per-row JSONL; default evals/<model name>.", OUT)
    n: int = opt(1, "Answers per prompt.", ("-n",))
    max_len: int = opt(1024, "Max tokens per --lm-data row (longer: end cut).")
    bootstrap: int = opt(10000, BOOTSTRAP_HELP)
    overwrite: bool = opt(False, "Replace a non-empty output dir.")

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "n", "max_len", "bootstrap")
        check_hallucination_judge(self.hallucination_judge)


@dataclass(frozen=True, kw_only=True)
class CompareConfig(Weights, Generation, DataOptions):
    items: tuple[str, ...] = arg()  # model/run dirs or samples files; the first is the baseline
    judge: str = opt("", "rm:DIR (a reward model), path/rule.py:function (runs that local Python file), or human "
                     "(blind pairs in the label UI); the win rate on --prompts.")
    prompts: str = opt("", "Prompts JSONL, needed when an item is a model: each answers every prompt once, with "
                       "the same seed.", PROMPTS)
    hallucination: str = opt("", HALLUCINATION_HELP + " Side by side, with the difference to the baseline.")
    hallucination_judge: str = opt("support", HALLUCINATION_JUDGE_HELP)
    bias: str = opt("", BIAS_HELP + " Side by side, with the difference to the baseline.")
    out: str = opt("compare.jsonl", "Per-prompt JSONL (responses, scores, outcomes).", OUT)
    bootstrap: int = opt(10000, BOOTSTRAP_HELP)

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "bootstrap")
        check_hallucination_judge(self.hallucination_judge)
        if self.hallucination_judge == "human" and self.hallucination:
            raise InstructError("compare --hallucination-judge human: label each model with instruct eval "
                                "--hallucination-judge human, then compare their summaries", 2)
        if not (self.judge or self.hallucination or self.bias):
            raise InstructError("compare needs --judge (a win rate on --prompts), --hallucination or --bias", 2)


@dataclass(frozen=True, kw_only=True)
class ChatConfig:
    CLI_SKIP: ClassVar[tuple] = INFERENCE_ONLY

    model: ModelConfig = opt(factory=ModelConfig)  # model.model is the positional MODEL
    system: str = opt("", "A system message the conversation starts with (or /system TEXT).")
    temperature: float = opt(0.7, "Sampling temperature; 0 = greedy (or /temp X).")
    top_p: float = opt(1.0, "Nucleus sampling threshold.")
    max_new_tokens: int = opt(256, "Max tokens per answer.")
    max_prompt_len: int = opt(2048, "A longer conversation keeps its last tokens.")
    seed: int = opt(0, SEED_HELP)

    def __post_init__(self):
        check_sampling(self.temperature, self.top_p)
        check_positive(self, "max_new_tokens", "max_prompt_len")


DATA_KINDS = {"sft": "demonstrations", "rm": "comparisons", "prompts": "prompts", "text": "pretraining"}


@dataclass(frozen=True, kw_only=True)
class DataConfig(DataOptions):
    CLI_SKIP: ClassVar[tuple] = INFERENCE_ONLY + ("quant", "dtype")  # only the tokenizer is loaded

    path: str = arg()
    kind: str = opt("sft", "Read it as: sft (demonstrations), rm (comparisons), prompts, or text (pretraining).",
                    ("--as",))
    model: ModelConfig = opt(factory=ModelConfig)  # its tokenizer renders the first row
    skip_invalid: bool = opt(False, RUN_HELP["skip_invalid"])

    def __post_init__(self):
        check_choice("as", self.kind, tuple(DATA_KINDS))


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    run_dir: str = arg()
    out: str = arg()
    format: str = opt("hf", "hf (a transformers model dir) | gguf (OUT holds <run name>.<outtype>.gguf for "
                      "llama.cpp and ollama, and an ollama Modelfile).")
    dtype: str = opt("float32", "float32 | bfloat16 | float16 for the saved weights (--format hf).")
    outtype: str = opt("f16", "f16 | bf16 | q8_0 for the GGUF's 2-D weights; norms stay f32 (--format gguf).")

    def __post_init__(self):
        check_choice("format", self.format, EXPORT_FORMATS)
        check_choice("dtype", self.dtype, EXPORT_DTYPES)
        check_choice("outtype", self.outtype, GGUF_OUTTYPES)
        if self.format == "gguf" and self.dtype != "float32":
            raise InstructError("--dtype applies to --format hf; a GGUF's weights are set by --outtype", 2)
        if self.format == "hf" and self.outtype != "f16":
            raise InstructError("--outtype applies to --format gguf; a transformers dir's weights are set by "
                                "--dtype", 2)


def to_dict(cfg) -> dict:
    return asdict(cfg)


def flat_dict(cfg) -> dict:
    """to_dict with the groups (model, train) merged in: each option under its flag's name."""
    flat = {}
    for k, v in to_dict(cfg).items():
        flat.update(v if isinstance(v, dict) else {k: v})
    return flat


def field_help(cls, name: str, f) -> str:
    """A field's help as its command shows it (a stage may word a shared field its own way: HELP)."""
    return getattr(cls, "HELP", {}).get(name) or f.metadata.get("help", "")

