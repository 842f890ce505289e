"""4-bit on CPUs: bitsandbytes' AVX512-BF16 path repacks each weight for a fused kernel that needs out widths in
multiples of 32 and in widths in multiples of 64; layers that do not fit stay unquantized (said once), the
plain path quantizes everything. Both paths are forced here, so both are covered on any machine."""

import copy

import pytest
import torch
from bitsandbytes import functional as bnb_functional
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn import modules as bnb_modules

from conftest import build_tiny_model
from instructcli import console, env, models, sources
from instructcli.config import ModelConfig

HAS_PACKED_KERNEL = bnb_modules.has_avx512bf16()  # this machine's, before any test forces a path


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    # 64 wide with 4 heads of 16: k/v projections are 16 wide (do not fit the packed kernel), the rest fit
    return build_tiny_model(tmp_path_factory.mktemp("mixed") / "model", hidden=64, heads=4)


def force_path(monkeypatch, packed: bool):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: packed)  # read by Linear4bit and by instruct


def kinds(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}


def test_the_width_rule_is_the_packing_codes_own(mixed_dir, monkeypatch):
    """Layers instruct keeps quantized pack without error in bitsandbytes' own packing code (pure torch, so it
    runs on any CPU); the layers it leaves out would fail there."""
    force_path(monkeypatch, True)
    warnings = []
    monkeypatch.setattr(console, "warn", warnings.append)
    model = models.load_base(sources.resolve(str(mixed_dir)), ModelConfig(quant="4bit"), "cpu")
    k = kinds(model)
    left = sorted(n for n, t in k.items() if t == "Linear")
    assert left == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("k", "v")]
    assert all(t == "Linear4bit" for n, t in k.items() if n not in left)
    assert len(warnings) == 1 and warnings[0].startswith("--quant 4bit: 4 linear layer(s) left unquantized")
    assert "model.layers.0.self_attn.k_proj (16x64)" in warnings[0]
    for n, m in model.named_modules():
        if isinstance(m, Linear4bit):
            bnb_functional._convert_weight_packed_for_cpu(m.weight.data.clone(), copy.deepcopy(m.weight.quant_state))
    odd = Linear4bit(64, 16, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    odd.weight = bnb_modules.Params4bit(torch.randn(16, 64), requires_grad=False, quant_type="nf4")
    odd = odd.to("cpu")  # quantizes
    with pytest.raises(AssertionError, match="divisible by block_n"):
        bnb_functional._convert_weight_packed_for_cpu(odd.weight.data.clone(), copy.deepcopy(odd.weight.quant_state))


@pytest.mark.skipif(not HAS_PACKED_KERNEL, reason="the packed kernel runs only on CPUs with AVX512-BF16")
def test_packed_path_runs_with_the_fallback(mixed_dir):
    model = models.load_base(sources.resolve(str(mixed_dir)), ModelConfig(quant="4bit"), "cpu")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
               for m in model.modules() if isinstance(m, Linear4bit))  # the fused kernel really ran
    assert torch.isfinite(logits).all()


def test_plain_path_quantizes_every_width(tiny_dir, monkeypatch):
    force_path(monkeypatch, False)
    warnings = []
    monkeypatch.setattr(console, "warn", warnings.append)
    assert models.four_bit_path("cpu") == "plain"
    model = models.load_base(sources.resolve(str(tiny_dir)), ModelConfig(quant="4bit"), "cpu")
    assert set(kinds(model).values()) == {"Linear4bit"} and not warnings
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_odd_width_model_trains_under_4bit_through_the_cli(cli, tiny_dir, tmp_path, monkeypatch):
    """The issue's user: a 16-wide model under --quant 4bit on an AVX512-BF16 CPU gets the fallback, said
    once, not a traceback."""
    from conftest import write_jsonl

    if not HAS_PACKED_KERNEL:
        force_path(monkeypatch, True)  # the decision only: nothing stays quantized, so no packed kernel runs
    demos = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "response": "Hi!"}] * 4)
    r = cli("sft", demos, "-o", tmp_path / "sft", "--model", tiny_dir, "--quant", "4bit", "--max-steps", 2,
            "-b", 2, "--eval-frac", 0)
    assert r.code == 0, r
    assert r.err.count("left unquantized") == 1 and "Traceback" not in r.err
    assert (tmp_path / "sft/adapter_model.safetensors").is_file()


def test_env_names_the_4bit_kernel(monkeypatch):
    force_path(monkeypatch, True)
    assert env.environment()["quant_4bit_kernel"].startswith("AVX512-BF16 packed (4-bit layers need out width")
    force_path(monkeypatch, False)
    assert env.environment()["quant_4bit_kernel"] == "plain"
