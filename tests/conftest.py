"""Tiny models built inside the tests: a 2-layer, 16-wide Llama and a byte-level BPE tokenizer trained offline
on the project's own sample data, with a ChatML chat template. Nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data_samples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _corpus() -> list[str]:
    out = []
    for name in ("demonstrations.jsonl", "pretrain.jsonl"):
        p = SAMPLES / name
        if p.exists():
            for line in p.read_text(encoding="utf-8").splitlines()[:150]:
                out.append(line)
    return out or ["the quick brown fox jumps over the lazy dog"] * 10


def build_tokenizer(path: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from instructcli.models import CHATML_TEMPLATE

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(path)
    return tok


def build_tiny_model(path: Path, seed: int = 0, layers: int = 2, hidden: int = 16, heads: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory) -> Path:
    """64 wide (head dim 32, k/v projections 32): every linear layer fits bitsandbytes' 4-bit kernels on any
    CPU, the AVX512-BF16 packed one included (out widths in multiples of 32, in widths of 64)."""
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden=64)


@pytest.fixture(scope="session")
def uniform_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model with its final norm zeroed: its next-token distribution is uniform, so every token costs
    log V and a text's likelihood is set by its token count alone (tests choose which text is likelier)."""
    import torch
    from transformers import AutoModelForCausalLM

    uniform = tmp_path_factory.mktemp("uniform") / "model"
    m = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.nn.init.zeros_(m.model.norm.weight)
    m.save_pretrained(uniform)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (uniform / f.name).write_bytes(f.read_bytes())
    return uniform


@pytest.fixture(scope="module")
def lm(tiny_dir):
    """The tiny model as a PPO policy with a non-zero LoRA adapter (decoding must go through it), in eval mode,
    its tokenizer, and four prompts of different lengths."""
    import torch

    from instructcli import models, sources
    from instructcli.config import ModelConfig

    src = sources.resolve(str(tiny_dir))
    tok = models.load_tokenizer(src)
    m = models.trainable_model(src.as_base(), ModelConfig(), "cpu")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    m.eval()
    prompts = [tok.encode(x) for x in ["hello there", "a", "the quick brown fox jumps over", "say b b b b"]]
    return m, tok, prompts


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # converted/merged models go to a per-session cache, never the user's
    monkeypatch.setenv("INSTRUCT_CACHE", str(tmp_path_factory.getbasetemp() / "instruct-cache"))


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


class CliResult:
    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-1500:]!r})"


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `instruct ARGS` in-process (the real entry point, exit code included); stdin may be given."""
    from instructcli.cli import main

    def run(*args, stdin: bytes | None = None) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["instruct", *map(str, args)])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run
