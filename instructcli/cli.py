"""The `instruct` command: flags (+ optional TOML config) -> a config -> one stage function. Thin on purpose.

torch and the stages are imported inside the commands, so `instruct --help` is instant.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import MISSING, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import click
import typer

from instructcli import __version__, config as configs
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


# ------------------------------------------------------------------------- flags built from the configs
def _options(cls, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """A typer option for every field of config class `cls` (nested groups flattened; positional fields and
    the class's CLI_SKIP left out): name, type, default and help as the dataclass declares them."""
    hints, out = get_type_hints(cls), []
    skip = skip + getattr(cls, "CLI_SKIP", ())
    for f in fields(cls):
        if f.metadata.get("arg"):
            continue
        if is_dataclass(hints[f.name]):  # a group (ModelConfig, TrainConfig): its defaults as this stage sets them
            group = f.default_factory()
            group_hints = get_type_hints(hints[f.name])
            for g in fields(group):
                if g.name not in skip:
                    out.append(_option(cls, g, group_hints[g.name], getattr(group, g.name)))
        elif f.name not in skip:
            default = inspect.Parameter.empty if f.default is MISSING else f.default
            out.append(_option(cls, f, hints[f.name], default))
    return out


def _option(cls, f, kind, default) -> inspect.Parameter:
    flags = f.metadata.get("flags") or ((f"--{f.name.replace('_', '-')}",) if kind is bool and not default else ())
    info = typer.Option(*flags, help=configs.field_help(cls, f.name, f))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])


def _build(cls, params: dict):
    """The config from the command's parameters: each field from the flag of its name, each group from its
    default (as the stage sets it) with the flags of its fields. Validation runs in the config."""
    hints, kw = get_type_hints(cls), {}
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            group = f.default_factory()
            kw[f.name] = replace(group, **{g.name: params[g.name] for g in fields(group) if g.name in params})
        elif f.name in params:
            v = params[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**kw)


def command(cls, help: str, name: str | None = None, toml: bool = True):
    """Register `body(<positional arguments>, cfg)` as a command whose options are built from `cls`: only the
    positional arguments are written by hand, in body's signature."""
    def register(body):
        hand = [p for p in inspect.signature(body, eval_str=True).parameters.values() if p.name != "cfg"]
        params = ([inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
                  + hand + _options(cls, skip=tuple(p.name for p in hand)))
        if toml:
            params += [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt),
                       inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False,
                                         annotation=PrintConfigOpt)]

        def run(ctx: typer.Context, **values):
            show = values.pop("print_config", False)
            values.pop("config", None)
            cfg = _build(cls, values)  # a bad value stops here, before anything runs
            if show:
                return _print_config(ctx, dict(ctx.params))
            try:
                return body(*(values[p.name] for p in hand), cfg=cfg)
            except KeyboardInterrupt as e:  # typer would make any of them exit 130: 128 + the signal instead
                raise SystemExit(128 + getattr(e, "signum", 2)) from None

        run.__name__, run.__doc__ = body.__name__, body.__doc__
        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return app.command(name, help=help)(run)
    return register


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


# ------------------------------------------------------------------------------------------- stages
@command(configs.SFTConfig, "Supervised fine-tuning on demonstrations (loss on response tokens only).")
def sft(data: Annotated[str, typer.Argument(help="Demonstrations JSONL ({prompt, response} or {messages}); "
                                            "- = stdin.")], cfg: configs.SFTConfig):
    from instructcli import sft as stage

    _result(stage.train(cfg))


@command(configs.RMConfig, "Train a reward model on rankings (K-way or pairwise), normalised so references score 0.")
def rm(data: Annotated[str, typer.Argument(help="Comparisons JSONL (K-way responses+ranks, or chosen/rejected).")],
       cfg: configs.RMConfig):
    from instructcli import rm as stage

    _result(stage.train(cfg))


@command(configs.ScoreConfig, "Add normalised reward-model scores to samples rows (one per response).", toml=False)
def score(reward: Annotated[str, typer.Argument(help="An rm run dir.")],
          samples: Annotated[str, typer.Argument(help="Samples JSONL (output of sample); - = stdin.")] = "-",
          cfg: configs.ScoreConfig = None):
    from instructcli import console, rm as stage

    n = stage.score(cfg)
    if cfg.out != "-":
        print(cfg.out)
    console.log(f"score: scored {n} rows")


@command(configs.LabelConfig, "Rank each prompt's K responses in the terminal (or by --judge), writing comparisons for "
         "rm.", toml=False)
def label(samples: Annotated[str, typer.Argument(help="Samples JSONL (output of sample).")], cfg: configs.LabelConfig):
    from instructcli import console, files, judge as judges, label as stage, loop

    fn = judges.make_judge(cfg.judge, cfg.quant, console.log) if cfg.judge else None
    # every answer is on disk (appended, fsynced) when it is made: SIGTERM and SIGHUP stop at once, as Ctrl-C
    with files.Lock(cfg.out, "--out"), loop.stop_at_once():
        print(json.dumps(stage.run(cfg.samples, cfg.out, judge=fn, noise=cfg.noise, seed=cfg.seed)))


@command(configs.PPOConfig, "PPO against a reward model with a per-token KL penalty to the SFT policy, plus PPO-ptx.")
def ppo(cfg: configs.PPOConfig):
    from instructcli import ppo as stage

    _result(stage.train(cfg))


@command(configs.SampleConfig, "Generate K responses per prompt (batched) as samples JSONL.")
def sample(model: Annotated[str, typer.Argument(help="Run dir, model dir, hub id, .gguf, or default.")] = "default",
           cfg: configs.SampleConfig = None):
    from instructcli import console, sample as stage

    count = stage.run(cfg)
    if cfg.out != "-":
        print(cfg.out)
    else:
        sys.stdout.flush()
    console.log(f"sample: wrote {count} rows to {'stdout' if cfg.out == '-' else cfg.out}")


@command(configs.EvalConfig, "Reward, KL, alignment tax, toxicity and truthfulness of one model; JSON summary on stdout, "
         "per-row JSONL in --out, plots with --report.", name="eval")
def eval_(model: Annotated[str, typer.Argument(help="Run dir (sft, ppo), model dir, hub id, .gguf, or default.")],
          cfg: configs.EvalConfig):
    from instructcli import evaluate as stage, loop

    out = cfg.out or str(Path("evals") / (Path(model.rstrip("/")).name.removesuffix(".gguf") or "default"))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with loop.OutOfMemory(lambda: f"with --batch-size {cfg.batch_size}, -n {cfg.n}, --max-new-tokens "
                                  f"{cfg.max_new_tokens}: try smaller ones, or --quant 8bit"):
        print(json.dumps(stage.run(replace(cfg, out=out)), indent=2))


@command(configs.CompareConfig, "Win rate of each model against the first (ties half) with a bootstrap 95 % CI; a table "
         "on stderr, JSON on stdout, per-prompt rows in --out.")
def compare(items: Annotated[list[str], typer.Argument(help="Two or more model/run dirs or samples files; the "
                                                       "first is the baseline.")], cfg: configs.CompareConfig):
    from instructcli import compare as stage, loop

    with loop.OutOfMemory(lambda: f"with --batch-size {cfg.batch_size}, --max-new-tokens {cfg.max_new_tokens}: "
                                  "try smaller ones, or --quant 8bit"):
        print(json.dumps(stage.compare(cfg), indent=2))


@command(configs.ChatConfig, "Talk with a model or run dir: answers streamed token by token; /system TEXT, "
         "/reset, /temp X, /save FILE (a messages row for sft), /exit. Through a pipe: one turn per line.",
         toml=False)
def chat(model: Annotated[str, typer.Argument(help="Run dir (sft, ppo), model dir, hub id, .gguf, or "
                                              "default.")] = "default", cfg: configs.ChatConfig = None):
    from instructcli import chat as stage

    stage.run(cfg)


@command(configs.ExportConfig, "Merge a run dir's adapter into its base: a plain transformers model dir (no peft "
         "needed), or with --format gguf a GGUF file for llama.cpp and ollama plus an ollama Modelfile.", toml=False)
def export(run_dir: Annotated[str, typer.Argument(help="A run dir (sft, ppo).")],
           out: Annotated[str, typer.Argument(help="New dir to write.")], cfg: configs.ExportConfig):
    from instructcli import console, models

    if cfg.format == "gguf":
        for path in models.export_gguf(cfg.run_dir, cfg.out, cfg.outtype, console.log):
            print(path)
    else:
        print(models.export_merged(cfg.run_dir, cfg.out, cfg.dtype, console.log))


@command(configs.DataConfig, "What a data file, dataset dir or hub dataset will be read as: the schema found, rows, "
         "K (rm), and the first row rendered through the model's chat template.", name="data", toml=False)
def data_(path: Annotated[str, typer.Argument(help="JSONL, CSV/TSV, parquet, JSON, arrow, a save_to_disk dir, a hub "
                                             "dataset id, or - (stdin).")], cfg: configs.DataConfig):
    from instructcli import describe

    print(describe.run(cfg))


@app.command(help="Versions, device, cache paths, and whether 8-bit/4-bit quantization works here (JSON).")
def env():
    from instructcli import checkpoint, env as probe

    info = {"versions": checkpoint.versions(), **probe.environment()}
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
# typer vendors its own click: its usage errors are not click.ClickException
USAGE_ERRORS = (click.exceptions.ClickException,
                *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"))


def main() -> None:
    debug = os.environ.get("INSTRUCT_DEBUG") == "1"
    try:
        from instructcli import console, parallel

        if not debug:  # before any library is imported: some talk at import
            console.quiet_libraries()

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
    except USAGE_ERRORS as e:  # exit 2
        e.show()
        rc = e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort, typer.Abort):  # a stopped command exits in `command`
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
    finally:
        from instructcli import console, files, parallel

        console.close_metrics()  # a run that failed or was stopped at once: its trackers end as failed
        files.release_locks()  # however the command ended, its outputs are free for the next writer
        parallel.close(clean=False)  # after an error; a no-op once the clean exit has left the group
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
