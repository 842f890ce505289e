"""`instruct env`: what this machine can do (device, quantization kernels, caches)."""

from __future__ import annotations

import os
from pathlib import Path

from instructcli.errors import InstructError
from instructcli.models import FOUR_BIT_PACKED, PACK_BLOCK_N, QUANT_BLOCK, four_bit_path, pick_device
from instructcli.sources import cache_dir, embedded_gguf


def quant_works(kind: str, device: str) -> str:
    """'ok' if a bitsandbytes 8-bit/4-bit linear layer runs forward and backward here, else the reason."""
    try:
        import bitsandbytes as bnb
        import torch

        torch.manual_seed(0)
        w = torch.randn(32, 64)
        if kind == "8bit":
            layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        layer = layer.to(device)
        x = torch.randn(4, 64, device=device, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        err = (y.float().cpu() - x.detach().cpu() @ w.T).abs().mean() / (x.detach().cpu() @ w.T).abs().mean()
        if not torch.isfinite(y).all() or err > 0.2:
            return f"runs but inaccurate (relative error {err:.2f})"
        return "ok"
    except Exception as e:  # noqa: BLE001 - any failure means "not here", with the reason
        return f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def environment() -> dict:
    import torch

    device = pick_device()
    kernel = four_bit_path(device)
    try:
        gguf = str(embedded_gguf())
    except InstructError as e:
        gguf = f"missing: {e}"
    return {
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "cpu_threads": torch.get_num_threads(),
        "cache_dir": str(cache_dir()),
        "embedded_model": gguf,
        "embedded_model_converted": sorted(str(p) for p in (cache_dir() / "models").glob("*") if p.is_dir())
        if (cache_dir() / "models").is_dir() else [],
        "hf_hub_cache": os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or str(Path.home() / ".cache/huggingface"),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE") == "1",
        "quant_8bit": quant_works("8bit", device),
        "quant_4bit": quant_works("4bit", device),
        "quant_4bit_kernel": kernel + (
            f" (4-bit layers need out width % {PACK_BLOCK_N} == 0 and in width % {QUANT_BLOCK} == 0; "
            "others stay unquantized)" if kernel == FOUR_BIT_PACKED else ""),
    }
