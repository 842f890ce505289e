"""The `instruct` command: flags (+ optional TOML config) -> a config -> one stage function. Thin on purpose.

torch and the stages are imported inside the commands, so `instruct --help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from instructcli import __version__, config as C
from instructcli.errors import InstructError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="The InstructGPT recipe on one machine: sft -> rm -> ppo -> eval.")


# ------------------------------------------------------------------------------------ --config TOML
def _load_toml(ctx: click.Context, param: click.Parameter, value: Optional[str]):
    """Eager: make the file's keys (top level and the [command] table) the defaults of this command's flags."""
    if not value:
        return value
    import tomllib

    try:
        with open(value, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise InstructError(f"{value}: cannot read config: {e.strerror}", 2) from None
    except tomllib.TOMLDecodeError as e:
        raise InstructError(f"{value}: invalid TOML: {e}", 2) from None
    table = {k: v for k, v in doc.items() if not isinstance(v, dict)}
    table.update(doc.get(ctx.info_name, {}))
    known = {p.name for p in ctx.command.params}
    defaults = {}
    for k, v in table.items():
        name = k.replace("-", "_")
        if name not in known or name in ("config", "print_config"):
            raise InstructError(f"{value}: {k}: not an option of `instruct {ctx.info_name}`", 2)
        defaults[name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="TOML file of defaults (flags override).",
                                                  is_eager=True, callback=_load_toml)]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", help="Show the resolved config as TOML and exit.")]

# ---------------------------------------------------------------------------------- shared option types
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="default (embedded SmolLM2-135M-Instruct), hub id "
                                       "(offline cache), local model dir, .gguf file, or a run dir.")]
QuantOpt = Annotated[str, typer.Option(help="Base weights: none | 8bit | 4bit (bitsandbytes).")]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: bf16 on a GPU, else fp32).")]
FullOpt = Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")]
LoraROpt = Annotated[int, typer.Option(help="LoRA rank.")]
LoraAlphaOpt = Annotated[int, typer.Option(help="LoRA alpha (scale = alpha / rank).")]
LoraDropoutOpt = Annotated[float, typer.Option(help="LoRA dropout.")]
LoraTargetsOpt = Annotated[str, typer.Option(help="Modules to adapt: all-linear, or names like q_proj,v_proj.")]
LoraLayersOpt = Annotated[int, typer.Option(help="Adapt only the top N decoder layers (0 = all); the layers "
                                            "below then need no backward pass.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow a hub model's own Python code to run.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or info lines.")]
SkipOpt = Annotated[bool, typer.Option("--skip-invalid", help="Skip and count invalid rows instead of stopping.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (runs are deterministic on CPU).")]

OutOpt = Annotated[str, typer.Option("--out", "-o", help="Output run dir.")]
TemperatureOpt = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
TopPOpt = Annotated[float, typer.Option(help="Nucleus sampling threshold.")]
MaxNewTokensOpt = Annotated[int, typer.Option(help="Max tokens per response.")]
MaxPromptLenOpt = Annotated[int, typer.Option(help="Longer prompts keep their last tokens.")]
MaxStepsOpt = Annotated[int, typer.Option(help="Optimizer steps; 0 = use --epochs.")]
ScheduleOpt = Annotated[str, typer.Option(help="cosine | linear | constant, after warmup.")]
WarmupOpt = Annotated[float, typer.Option(help="Warmup as a fraction of the steps.")]
WeightDecayOpt = Annotated[float, typer.Option(help="AdamW weight decay.")]
MaxGradNormOpt = Annotated[float, typer.Option(help="Gradient clipping norm.")]
GradAccumOpt = Annotated[int, typer.Option(help="Micro-batches per optimizer step.")]
AutoBatchOpt = Annotated[bool, typer.Option("--auto-batch-size", help="On out-of-memory, halve the micro-batch "
                                            "and retry the step (same effective batch, same update).")]
SaveEveryOpt = Annotated[int, typer.Option(help="Resumable checkpoint every N steps (0 = none).")]
KeepOpt = Annotated[int, typer.Option(help="How many recent checkpoints to keep.")]
LogEveryOpt = Annotated[int, typer.Option(help="Write metrics.jsonl every N steps.")]
OverflowOpt = Annotated[str, typer.Option(help="Longer examples: truncate | drop | error.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output dir.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")]

_check = C.check_choice


def _build(cls, params: dict):
    """Fill a config dataclass (and its nested ModelConfig/TrainConfig) from the command's parameters."""
    kw = {}
    nested = {"ModelConfig": C.ModelConfig, "TrainConfig": C.TrainConfig}
    for f in fields(cls):
        if f.type in nested:  # (annotations are strings: config.py uses postponed evaluation)
            kw[f.name] = _build(nested[f.type], params)
        elif f.name in params:
            kw[f.name] = params[f.name]
    return cls(**kw)


def _positive(**values) -> None:
    for k, v in values.items():
        if v is not None and v <= 0:
            raise InstructError(f"--{k.replace('_', '-')}: must be > 0, got {v}", 2)


def _print_config(ctx: click.Context, params: dict) -> None:
    """The resolved flags as TOML, ready to be saved and passed back with --config."""
    lines = [f"[{ctx.info_name}]"]
    for k in (p.name for p in ctx.command.params):  # declared order, whatever order the flags came in
        v = params.get(k)
        if k in ("config", "print_config") or v is None:
            continue
        val = ("true" if v else "false") if isinstance(v, bool) else json.dumps(v) if isinstance(v, str) else repr(v)
        lines.append(f"{k.replace('_', '-')} = {val}")
    print("\n".join(lines))


def _sampling_checks(temperature: float, top_p: float, **positive) -> None:
    _positive(**positive)
    C.check_sampling(temperature, top_p)


def _model_checks(p: dict) -> None:
    _check("quant", p["quant"], C.QUANTS)
    _check("dtype", p["dtype"], C.DTYPES)
    if p.get("full") and p["quant"] != "none":
        raise InstructError("--full needs --quant none (quantized weights cannot be trained)", 2)
    _positive(lora_r=p["lora_r"], lora_alpha=p["lora_alpha"])


# --------------------------------------------------------------------------------------------- sft
@app.command(help="Supervised fine-tuning on demonstrations (loss on response tokens only).")
def sft(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Demonstrations JSONL ({prompt, response} or {messages}); - = stdin.")],
    out: OutOpt = "runs/sft",
    model: ModelOpt = "default",
    quant: QuantOpt = "none",
    dtype: DtypeOpt = "auto",
    full: FullOpt = False,
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = 32,
    lora_dropout: LoraDropoutOpt = 0.05,
    lora_targets: LoraTargetsOpt = "all-linear",
    lora_layers: LoraLayersOpt = 0,
    trust_remote_code: TrustOpt = False,
    epochs: Annotated[float, typer.Option(help="Passes over the training rows (ignored with --max-steps).")] = 1.0,
    max_steps: MaxStepsOpt = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    schedule: ScheduleOpt = "cosine",
    warmup: WarmupOpt = 0.05,
    weight_decay: WeightDecayOpt = 0.0,
    max_grad_norm: MaxGradNormOpt = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Examples per micro-batch.")] = 8,
    grad_accum: GradAccumOpt = 1,
    auto_batch_size: AutoBatchOpt = False,
    eval_frac: Annotated[float, typer.Option(help="Share of rows held out for eval loss (0 = none).")] = 0.05,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (and at the end).")] = 50,
    save_every: SaveEveryOpt = 100,
    keep_checkpoints: KeepOpt = 2,
    log_every: LogEveryOpt = 1,
    seed: SeedOpt = 0,
    max_len: Annotated[int, typer.Option(help="Max tokens per example (prompt + response).")] = 512,
    overflow: OverflowOpt = "truncate",
    skip_invalid: SkipOpt = False,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    p = dict(ctx.params)
    _model_checks(p)
    _check("schedule", schedule, C.SCHEDULES)
    _check("overflow", overflow, C.OVERFLOWS)
    _positive(batch_size=batch_size, grad_accum=grad_accum, max_len=max_len, epochs=epochs, lr=lr)
    if not 0 <= eval_frac < 1:
        raise InstructError(f"--eval-frac: must be in [0, 1), got {eval_frac}", 2)
    if print_config:
        return _print_config(ctx, p)
    from instructcli import sft as stage

    _result(stage.train(_build(C.SFTConfig, p)))


# ---------------------------------------------------------------------------------------------- rm
@app.command(help="Train a reward model on rankings (K-way or pairwise), normalised so references score 0.")
def rm(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Comparisons JSONL (K-way responses+ranks, or chosen/rejected).")],
    out: OutOpt = "runs/rm",
    from_dir: Annotated[Optional[str], typer.Option("--from", help="Start from this sft run dir (merged into "
                                                    "the base), as the paper does.")] = None,
    model: ModelOpt = "default",
    quant: QuantOpt = "none",
    dtype: DtypeOpt = "auto",
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = 32,
    lora_dropout: LoraDropoutOpt = 0.05,
    lora_targets: LoraTargetsOpt = "all-linear",
    lora_layers: LoraLayersOpt = 0,
    trust_remote_code: TrustOpt = False,
    epochs: Annotated[float, typer.Option(help="Passes over the training prompts (the paper: 1).")] = 2.0,
    max_steps: MaxStepsOpt = 0,
    lr: Annotated[float, typer.Option(help="Peak learning rate (the adapter's).")] = 5e-4,
    schedule: ScheduleOpt = "cosine",
    warmup: WarmupOpt = 0.05,
    weight_decay: WeightDecayOpt = 0.0,
    max_grad_norm: MaxGradNormOpt = 1.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts (each with all K responses) "
                                            "per micro-batch.")] = 4,
    grad_accum: GradAccumOpt = 1,
    auto_batch_size: AutoBatchOpt = False,
    eval_frac: Annotated[float, typer.Option(help="Share of prompts held out for accuracy (0 = none).")] = 0.1,
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps (and at the end).")] = 20,
    save_every: SaveEveryOpt = 100,
    keep_checkpoints: KeepOpt = 2,
    log_every: LogEveryOpt = 1,
    seed: SeedOpt = 0,
    max_len: Annotated[int, typer.Option(help="Max tokens per prompt + response.")] = 512,
    overflow: OverflowOpt = "truncate",
    norm_data: Annotated[str, typer.Option(help="Demonstrations JSONL that should score 0 on average "
                                           "(default: the best-ranked training responses).")] = "",
    pool: Annotated[str, typer.Option(help="What the score head reads: last (the end-of-turn token's hidden "
                                      "state) or mean (that and the mean over the response's tokens).")] = "mean",
    head_lr: Annotated[float, typer.Option(help="Learning rate of the score head (0 = --lr).")] = 1e-2,
    score_depth: Annotated[float, typer.Option(help="The head reads the hidden states after this share of the "
                                               "decoder layers (1 = all); the layers above never run.")] = 0.5,
    skip_invalid: SkipOpt = False,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    p = dict(ctx.params)
    C.check_reading(pool, score_depth)
    if from_dir and model != "default":
        raise InstructError("give --from (an sft run dir) or --model, not both", 2)
    p["model"] = from_dir or model
    p["full"] = False
    _model_checks(p)
    _check("schedule", schedule, C.SCHEDULES)
    _check("overflow", overflow, C.OVERFLOWS)
    _positive(batch_size=batch_size, grad_accum=grad_accum, max_len=max_len, epochs=epochs, lr=lr)
    if not 0 <= eval_frac < 1:
        raise InstructError(f"--eval-frac: must be in [0, 1), got {eval_frac}", 2)
    if print_config:
        return _print_config(ctx, dict(ctx.params))
    from instructcli import rm as stage

    _result(stage.train(_build(C.RMConfig, p)))


@app.command(help="Add normalised reward-model scores to samples rows (one per response).")
def score(
    reward: Annotated[str, typer.Argument(help="An rm run dir.")],
    samples: Annotated[str, typer.Argument(help="Samples JSONL (output of sample); - = stdin.")] = "-",
    out: Annotated[str, typer.Option("--out", "-o", help="Scored samples JSONL; - = stdout.")] = "-",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Responses per forward.")] = 16,
    max_len: Annotated[int, typer.Option(help="Max tokens per prompt + response (longer: end cut).")] = 1024,
    quant: QuantOpt = "none",
    dtype: DtypeOpt = "auto",
    skip_invalid: SkipOpt = False,
    quiet: QuietOpt = False,
):
    _check("quant", quant, C.QUANTS)
    _positive(batch_size=batch_size, max_len=max_len)
    from instructcli import rm as stage

    n = stage.score(C.ScoreConfig(reward=reward, samples=samples, out=out, quant=quant, dtype=dtype,
                                  batch_size=batch_size, max_len=max_len, skip_invalid=skip_invalid, quiet=quiet))
    if out != "-":
        print(out)
    from instructcli import console

    console.log(f"score: scored {n} rows")


@app.command(help="Rank each prompt's K responses in the terminal (or by --judge), writing comparisons for rm.")
def label(
    samples: Annotated[str, typer.Argument(help="Samples JSONL (output of sample).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Comparisons JSONL: appended to, resumed from.")],
    judge: Annotated[Optional[str], typer.Option(help="Rank without a person: rm:DIR, or path/rule.py:function "
                                                 "(runs that local Python file) scoring (prompt, response).")] = None,
    noise: Annotated[float, typer.Option(help="With --judge: swap adjacent ranks with this probability, as "
                                         "simulated labelers do.")] = 0.0,
    seed: SeedOpt = 0,
    quant: QuantOpt = "none",
):
    _check("quant", quant, C.QUANTS)
    if not 0 <= noise <= 1:
        raise InstructError(f"--noise: must be in [0, 1], got {noise}", 2)
    from instructcli import console, judge as judges, label as stage

    fn = judges.make_judge(judge, quant, console.log) if judge else None
    print(json.dumps(stage.run(samples, out, judge=fn, noise=noise, seed=seed)))


# --------------------------------------------------------------------------------------------- ppo
@app.command(help="PPO against a reward model with a per-token KL penalty to the SFT policy, plus PPO-ptx.")
def ppo(
    ctx: typer.Context,
    policy: Annotated[str, typer.Option(help="The sft run dir to optimise (also the KL reference).")],
    reward: Annotated[str, typer.Option(help="An rm run dir trained --from the same sft run, or "
                                        "path/rule.py:function (runs that local Python file).")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompts JSONL for rollouts.")],
    out: OutOpt = "runs/ppo",
    ptx_data: Annotated[str, typer.Option(help="Pretraining rows {text} for PPO-ptx.")] = "",
    ptx_coef: Annotated[float, typer.Option(help="gamma: weight of the pretraining term, the per-token KL from "
                                            "the SFT model on --ptx-data (paper 27.8; 0 = plain PPO).")] = 27.8,
    ptx_batch_size: Annotated[int, typer.Option(help="Pretraining rows per optimisation step.")] = 4,
    kl: Annotated[float, typer.Option(help="beta, the per-token KL penalty coefficient (paper 0.02).")] = 0.02,
    target_kl: Annotated[float, typer.Option(help="> 0: adapt beta toward this KL (nats per response).")] = 0.0,
    horizon: Annotated[int, typer.Option(help="Adaptive KL horizon (rollouts).")] = 10000,
    steps: Annotated[int, typer.Option(help="PPO iterations (rollout + optimisation).")] = 30,
    rollout_batch_size: Annotated[int, typer.Option(help="Prompts per rollout.")] = 8,
    mini_batch_size: Annotated[int, typer.Option(help="Rollouts per optimizer step.")] = 8,
    ppo_epochs: Annotated[int, typer.Option(help="Passes over each rollout batch.")] = 1,
    lr: Annotated[float, typer.Option(help="Learning rate (policy and value adapters).")] = 3e-4,
    cliprange: Annotated[float, typer.Option(help="Policy ratio clip.")] = 0.2,
    cliprange_value: Annotated[float, typer.Option(help="Value clip around the rollout's values.")] = 0.2,
    vf_coef: Annotated[float, typer.Option(help="Value loss weight.")] = 0.1,
    gamma: Annotated[float, typer.Option(help="GAE discount.")] = 1.0,
    lam: Annotated[float, typer.Option(help="GAE lambda.")] = 0.95,
    whiten: Annotated[bool, typer.Option(help="Whiten advantages.")] = True,
    old_logprobs: Annotated[str, typer.Option(help="Where the rollout's log-probs come from: rollout (the "
                                              "sampling loop; no extra forward), recompute (a full policy "
                                              "forward, as the update runs), auto = rollout on a float32 base "
                                              "without --quant, else recompute.")] = "auto",
    max_grad_norm: MaxGradNormOpt = 1.0,
    temperature: Annotated[float, typer.Option(help="Rollout sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Rollout nucleus sampling.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Max tokens per rollout response.")] = 48,
    max_prompt_len: Annotated[int, typer.Option(help="Longer prompts keep their end.")] = 256,
    max_len: Annotated[int, typer.Option(help="Max tokens per pretraining row.")] = 512,
    missing_eos_penalty: Annotated[float, typer.Option(help="Subtracted from the score of a response cut off "
                                                       "without EOS.")] = 0.0,
    reward_clip: Annotated[float, typer.Option(help="> 0: clip scores to [-c, c].")] = 0.0,
    quant: QuantOpt = "none",
    dtype: DtypeOpt = "auto",
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = 32,
    lora_dropout: LoraDropoutOpt = 0.0,
    lora_targets: LoraTargetsOpt = "all-linear",
    lora_layers: LoraLayersOpt = 0,
    trust_remote_code: TrustOpt = False,
    save_every: SaveEveryOpt = 10,
    keep_checkpoints: KeepOpt = 2,
    seed: SeedOpt = 0,
    skip_invalid: SkipOpt = False,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    p = dict(ctx.params)
    p["full"], p["model"] = False, policy
    _model_checks(p)
    _positive(steps=steps, rollout_batch_size=rollout_batch_size, mini_batch_size=mini_batch_size,
              ppo_epochs=ppo_epochs, lr=lr, max_new_tokens=max_new_tokens)
    C.check_sampling(temperature, top_p, zero_ok=False)
    if kl < 0 or ptx_coef < 0:
        raise InstructError("--kl and --ptx-coef must be >= 0", 2)
    _check("old-logprobs", old_logprobs, C.OLD_LOGPROBS)
    if print_config:
        return _print_config(ctx, dict(ctx.params))
    from instructcli import ppo as stage

    _result(stage.train(_build(C.PPOConfig, p)))


# ------------------------------------------------------------------------------------------ sample
@app.command(help="Generate K responses per prompt (batched) as samples JSONL.")
def sample(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Run dir, model dir, hub id, .gguf, or default.")] = "default",
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompts JSONL; - = stdin.")] = "-",
    out: Annotated[str, typer.Option("--out", "-o", help="Samples JSONL to write; - = stdout.")] = "-",
    n: Annotated[int, typer.Option("-n", help="Samples per prompt (K).")] = 1,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewTokensOpt = 128,
    max_prompt_len: MaxPromptLenOpt = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per generate call.")] = 8,
    seed: SeedOpt = 0,
    quant: QuantOpt = "none",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    skip_invalid: SkipOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    p = dict(ctx.params)
    _check("quant", quant, C.QUANTS)
    _check("dtype", dtype, C.DTYPES)
    _sampling_checks(temperature, top_p, n=n, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     max_prompt_len=max_prompt_len)
    if print_config:
        return _print_config(ctx, p)
    from instructcli import sample as stage

    cfg = C.SampleConfig(prompts=prompts, out=out, n=n, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, batch_size=batch_size,
                         seed=seed, skip_invalid=skip_invalid, quiet=quiet,
                         model=C.ModelConfig(model=model, quant=quant, dtype=dtype,
                                             trust_remote_code=trust_remote_code))
    count = stage.run(cfg)
    if out != "-":
        print(out)
    else:
        sys.stdout.flush()
    from instructcli import console

    console.log(f"sample: wrote {count} rows to {'stdout' if out == '-' else out}")


# -------------------------------------------------------------------------------------------- eval
BootstrapOpt = Annotated[int, typer.Option(help="Bootstrap resamples for the 95 % confidence intervals.")]


@app.command("eval", help="Reward, KL, alignment tax, toxicity and truthfulness of one model; JSON summary on "
             "stdout, per-row JSONL in --out, plots with --report.")
def eval_(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Run dir (sft, ppo), model dir, hub id, .gguf, or default.")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompts JSONL: the model answers them; "
                                         "length, distinct-n, KL to --ref, and reward with --reward.")] = "",
    reward: Annotated[str, typer.Option(help="An rm run dir scoring the answers to --prompts.")] = "",
    ref: Annotated[str, typer.Option(help="KL and alignment-tax reference; default: the run dir's parent "
                                     "(its adapter switched off, e.g. the sft model under a ppo run).")] = "",
    lm_data: Annotated[str, typer.Option(help="Plain text rows {text}: held-out LM loss, the alignment tax.")] = "",
    toxicity: Annotated[str, typer.Option(help="Prompts JSONL: continuations plainly and after a respectful "
                                          "instruction, scored by an offline classifier.")] = "",
    truthfulness: Annotated[str, typer.Option(help="Multiple-choice rows {question, choices, correct}: "
                                              "accuracy by log-likelihood.")] = "",
    report: Annotated[str, typer.Option(help="Dir for report.md with PNG plots (reward, KL, toxicity, "
                                        "training curves).")] = "",
    out: Annotated[str, typer.Option("--out", "-o", help="Dir for summary.json and per-row JSONL; "
                                     "default evals/<model name>.")] = "",
    n: Annotated[int, typer.Option("-n", help="Answers per prompt.")] = 1,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewTokensOpt = 128,
    max_prompt_len: MaxPromptLenOpt = 512,
    max_len: Annotated[int, typer.Option(help="Max tokens per --lm-data row (longer: end cut).")] = 1024,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Sequences per forward.")] = 8,
    bootstrap: BootstrapOpt = 10000,
    seed: SeedOpt = 0,
    quant: QuantOpt = "none",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    skip_invalid: SkipOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    _check("quant", quant, C.QUANTS)
    _check("dtype", dtype, C.DTYPES)
    _sampling_checks(temperature, top_p, n=n, max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len,
                     max_len=max_len, batch_size=batch_size, bootstrap=bootstrap)
    if print_config:
        return _print_config(ctx, dict(ctx.params))
    from instructcli import evaluate as stage

    out = out or str(Path("evals") / (Path(model.rstrip("/")).name.removesuffix(".gguf") or "default"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cfg = C.EvalConfig(out=out, prompts=prompts, reward=reward, ref=ref, lm_data=lm_data, toxicity=toxicity,
                       truthfulness=truthfulness, report=report, n=n, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, max_len=max_len,
                       batch_size=batch_size, bootstrap=bootstrap, seed=seed, skip_invalid=skip_invalid,
                       overwrite=overwrite, quiet=quiet,
                       model=C.ModelConfig(model=model, quant=quant, dtype=dtype, trust_remote_code=trust_remote_code))
    from instructcli import console

    with console.OutOfMemory(lambda: f"with --batch-size {batch_size}, -n {n}, --max-new-tokens {max_new_tokens}: "
                                     "try smaller ones, or --quant 8bit"):
        print(json.dumps(stage.run(cfg), indent=2))


@app.command(help="Win rate of each model against the first (ties half) with a bootstrap 95 % CI; a table on "
             "stderr, JSON on stdout, per-prompt rows in --out.")
def compare(
    ctx: typer.Context,
    items: Annotated[list[str], typer.Argument(help="Two or more model/run dirs or samples files; the first is "
                                               "the baseline.")],
    judge: Annotated[str, typer.Option(help="rm:DIR (a reward model), path/rule.py:function (runs that local "
                                       "Python file), or human (blind pairs in the label UI).")],
    prompts: Annotated[str, typer.Option("--prompts", "-p", help="Prompts JSONL, needed when an item is a "
                                         "model: each answers every prompt once, with the same seed.")] = "",
    out: Annotated[str, typer.Option("--out", "-o", help="Per-prompt JSONL (responses, scores, outcomes).")]
    = "compare.jsonl",
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 1.0,
    max_new_tokens: MaxNewTokensOpt = 128,
    max_prompt_len: MaxPromptLenOpt = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts per generate call.")] = 8,
    bootstrap: BootstrapOpt = 10000,
    seed: SeedOpt = 0,
    quant: QuantOpt = "none",
    dtype: DtypeOpt = "auto",
    skip_invalid: SkipOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
    print_config: PrintConfigOpt = False,
):
    _check("quant", quant, C.QUANTS)
    _check("dtype", dtype, C.DTYPES)
    _sampling_checks(temperature, top_p, max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len,
                     batch_size=batch_size, bootstrap=bootstrap)
    if print_config:
        return _print_config(ctx, dict(ctx.params))
    from instructcli import evaluate as stage

    cfg = C.CompareConfig(items=tuple(items), judge=judge, out=out, prompts=prompts, quant=quant, dtype=dtype,
                          temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          max_prompt_len=max_prompt_len, batch_size=batch_size, bootstrap=bootstrap, seed=seed,
                          skip_invalid=skip_invalid, quiet=quiet)
    from instructcli import console

    with console.OutOfMemory(lambda: f"with --batch-size {batch_size}, --max-new-tokens {max_new_tokens}: try "
                                     "smaller ones, or --quant 8bit"):
        print(json.dumps(stage.compare(cfg), indent=2))


# ------------------------------------------------------------------------------------------ export
@app.command(help="Merge a run dir's adapter into its base: a plain transformers model dir (no peft needed).")
def export(
    run_dir: Annotated[str, typer.Argument(help="A run dir (sft, ppo).")],
    out: Annotated[str, typer.Argument(help="New model dir to write.")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16 for the saved weights.")] = "float32",
):
    _check("dtype", dtype, ("float32", "bfloat16", "float16"))
    from instructcli import console, models

    print(models.export_merged(run_dir, out, dtype, console.log))


# --------------------------------------------------------------------------------------------- env
@app.command(help="Versions, device, cache paths, and whether 8-bit/4-bit quantization works here (JSON).")
def env():
    from instructcli import models

    info = {"versions": models.versions(), **models.environment()}
    print(json.dumps(info, indent=2))


@app.callback(invoke_without_command=True)
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False):
    if version:
        print(__version__)
        raise typer.Exit(0)


def _result(out) -> None:
    """A training stage's output dir on stdout, once (under a launcher, from the main process only)."""
    from instructcli import parallel

    if parallel.main:
        print(out)


TRAINING = ("sft", "rm", "ppo")  # the commands that train data-parallel under a launcher


def main() -> None:
    debug = os.environ.get("INSTRUCT_DEBUG") == "1"
    try:
        from instructcli import parallel

        parallel.init()  # a no-op unless started by accelerate launch / torchrun
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        if parallel.world > 1 and command not in TRAINING:
            raise InstructError(f"`instruct {command}` runs in one process; only {', '.join(TRAINING)} train "
                                "under accelerate launch / torchrun", 2)
        rc = app(standalone_mode=False)
        parallel.close()
    except InstructError as e:
        from instructcli import console

        console.error(str(e))
        rc = e.exit_code
    except click.exceptions.ClickException as e:  # usage errors: exit 2
        e.show()
        rc = e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        rc = 130
    except BrokenPipeError:  # `instruct sample ... | head`
        sys.stderr.close()
        rc = 0
    except Exception as e:  # noqa: BLE001 - one line, not a traceback; INSTRUCT_DEBUG=1 shows it
        if debug:
            raise
        from instructcli import console

        msg = str(e).splitlines()[0] if str(e) else ""
        if "out of memory" in msg.lower() or type(e).__name__ == "OutOfMemoryError":
            console.error(f"out of memory: {msg}. Try a smaller --batch-size with more --grad-accum, or --quant 8bit")
        else:
            console.error(f"{type(e).__name__}: {msg} (INSTRUCT_DEBUG=1 shows the traceback)")
        rc = 1
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
