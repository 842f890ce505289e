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
