"""A config built in Python (PPOConfig(...)) and the CLI's flags must mean the same run: every flag's default
equals its dataclass field's default (they had drifted: ppo --lora-dropout was 0.0 in the CLI, 0.05 in
PPOConfig)."""

from dataclasses import MISSING, fields

import pytest
import typer

from instructcli import cli, config as C


def dataclass_defaults(cls, instance=None) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            continue
        if f.name in ("model", "train") and hasattr(value, "__dataclass_fields__"):
            out.update({k: v for k, v in vars(value).items()})
        else:
            out[f.name] = value
    return out


@pytest.mark.parametrize("name,cls", [("sft", C.SFTConfig), ("rm", C.RMConfig), ("ppo", C.PPOConfig)])
def test_cli_defaults_equal_the_config_defaults(name, cls):
    command = typer.main.get_command(cli.app).commands[name]
    flags = {p.name: p.default for p in command.params}
    want = dataclass_defaults(cls)
    shared = sorted(set(flags) & set(want) - {"model"})  # ppo/rm name the model by --policy / --from
    assert len(shared) > 15
    drift = {k: (flags[k], want[k]) for k in shared if flags[k] != want[k]}
    assert not drift, drift


COMMANDS = [("sft", C.SFTConfig), ("rm", C.RMConfig), ("ppo", C.PPOConfig), ("score", C.ScoreConfig),
            ("label", C.LabelConfig), ("sample", C.SampleConfig), ("eval", C.EvalConfig),
            ("compare", C.CompareConfig), ("export", C.ExportConfig), ("chat", C.ChatConfig)]


def config_fields(cls) -> dict:
    """name -> (default or MISSING, positional?) of every field of a config, groups flattened, less CLI_SKIP."""
    out = {}
    for f in fields(cls):
        if hasattr(f.type, "__dataclass_fields__") or f.name in ("model", "train") and f.default_factory is not MISSING:
            group = f.default_factory()
            out.update({g.name: (getattr(group, g.name), False) for g in fields(group)})
        else:
            out[f.name] = (f.default, bool(f.metadata.get("arg")))
    for k in getattr(cls, "CLI_SKIP", ()):
        out.pop(k, None)
    return out


@pytest.mark.parametrize("name,cls", COMMANDS)
def test_every_flag_is_a_field_and_every_field_a_flag(name, cls):
    """One declaration per option: a command's options are exactly its config's fields (positional arguments
    aside), each with the field's default and help."""
    command = typer.main.get_command(cli.app).commands[name]
    options = {p.name: p for p in command.params if p.name not in ("config", "print_config")}
    want = config_fields(cls)
    assert set(options) == set(want), (set(options) ^ set(want))
    for k, p in options.items():
        default, positional = want[k]
        if p.param_type_name == "argument":
            continue  # written by hand in cli.py, with its help (sample's MODEL is ModelConfig.model)
        assert not positional, k
        assert p.default == (None if default is MISSING else default) or p.required, (k, p.default, default)
        assert p.help, f"--{k} has no help"


def test_a_config_built_in_python_is_checked_as_flags_are():
    """Validation lives in the configs: a bad value in Python is the same one-line error as from a flag."""
    from instructcli.errors import InstructError

    with pytest.raises(InstructError, match="--top-p"):
        C.SampleConfig(top_p=0.0)
    with pytest.raises(InstructError, match="--quant"):
        C.ModelConfig(quant="3bit")
    for bad in (lambda: C.SampleConfig(decode="fast"),
                lambda: C.PPOConfig(policy="p", reward="r", prompts="x", ptx_coef=0, decode="graph")):
        with pytest.raises(InstructError, match="--decode: expected one of auto | static | eager") as e:
            bad()
        assert e.value.exit_code == 2
    for kw, msg in (({"schedule": "step"}, "--schedule: expected one of"),
                    ({"stop_kl": -1.0}, "--stop-kl and --micro-batch-size must be"),
                    ({"micro_batch_size": -1}, "--micro-batch-size must be >= 0"),
                    ({"stop_kl_temperature": 0.0}, "--stop-kl-temperature")):
        with pytest.raises(InstructError, match=msg) as e:
            C.PPOConfig(policy="p", reward="r", prompts="x", ptx_coef=0, **kw)
        assert e.value.exit_code == 2
    with pytest.raises(InstructError, match="--eval-frac"):
        C.TrainConfig(eval_frac=1.0)
    with pytest.raises(InstructError, match="--mini-batch-size"):
        C.PPOConfig(policy="p", reward="r", prompts="x", rollout_batch_size=6, mini_batch_size=4, ptx_coef=0)
    with pytest.raises(InstructError, match="--from"):
        C.RMConfig(data="d", from_dir="runs/sft", model=C.ModelConfig(model="other"))
    assert C.RMConfig(data="d", from_dir="runs/sft").model.model == "runs/sft"
    assert C.PPOConfig(policy="runs/sft", reward="r", prompts="x", ptx_coef=0).model.model == "runs/sft"


def test_a_usage_error_is_exit_2_in_one_line(cli):
    r = cli("sft", "x.jsonl", "--no-such-flag")
    assert r.code == 2 and "No such option: --no-such-flag" in r.err and "Traceback" not in r.err, r
    r = cli("ppo", "--policy", "p")  # required options missing
    assert r.code == 2 and "Missing option" in r.err, r
