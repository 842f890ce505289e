"""The CPU-only decode forms of the linear layers: while the sampling loop decodes a few rows at a time,
nn.Linear and peft's LoRA Linear compute column-major, which MKL runs faster at those sizes. Isolated here and
benched in bench/rollout.py."""

from __future__ import annotations

import contextlib
import sys

import torch


# Decoding on CPU: at a handful of rows, MKL's sgemm reads a (out, in) weight ~1.3x slower when the weight is
# its second operand (x @ W.T, what nn.Linear does) than when it is the first (W @ x.T): 1536x576 at 8 rows,
# 412 vs 314 us on the 2-core x86 CI machine (bench/rollout.py has the end-to-end figures). Both compute the
# same products, summed in another order. Up to this many rows per call; the gain shrinks with the rows, and
# from 256 on the two are level.
DECODE_ROWS = 64


def _columns(x, rows: int) -> torch.Tensor:
    """x as the (in, rows) transpose of a row-major (rows, in) matrix; above 8 rows, zero rows are added up to a
    multiple of 8: MKL's kernel is slow at other counts (1536x576 at 15 columns: 859 us, at 16: 384 us), which
    a batch reaches as its answers end."""
    x2 = x.reshape(rows, -1)
    pad = -rows % 8 if rows > 8 else 0
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    return x2.T


def _plain_call(x, rows: int, *tensors) -> bool:
    """Whether a call is one the decode forms cover: a few rows, none empty, no autocast, one dtype throughout."""
    return (0 < rows <= DECODE_ROWS and not torch.is_autocast_enabled(x.device.type)
            and all(t.dtype == x.dtype for t in tensors if t is not None))


def _decode_product(x, rows: int, weight, bias, lora=None) -> torch.Tensor:
    """x W^T + b (+ s (x A^T) B^T with lora = (A, B, s)), computed column-major: W x, then B (A x) added."""
    xt = _columns(x, rows)
    y = weight @ xt
    if bias is not None:
        y = y + bias[:, None]
    if lora is not None:
        A, B, scale = lora
        y = y.addmm_(B, A @ xt, alpha=scale)
    return y[:, :rows].T.contiguous().view(*x.shape[:-1], -1)


def _decode_linear(mod, orig, x, *args, **kwargs):
    """nn.Linear's forward, computed as (W @ x.T).T for a few rows on CPU."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    if args or kwargs or not _plain_call(x, rows, mod.weight, mod.bias):
        return orig(x, *args, **kwargs)
    return _decode_product(x, rows, mod.weight, mod.bias)


def _decode_lora(mod, orig, x, *args, **kwargs):
    """peft's LoRA Linear forward (one plain adapter: no bias, variant or live dropout), as one column-major
    product chain: W x + s B (A x), with W x as in _decode_linear. peft's own forward runs about 8 ops and a
    Python loop per layer; at decode sizes that overhead was a quarter of the step. The sublayers' own
    forwards and hooks are not called (instruct registers none)."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    active = [a for a in mod.active_adapters if a in mod.lora_A]
    if args or kwargs or mod.disable_adapters or mod.merged or len(active) != 1 or active[0] in mod.lora_variant:
        return orig(x, *args, **kwargs)
    a = active[0]
    base, A, B, drop = mod.base_layer, mod.lora_A[a], mod.lora_B[a], mod.lora_dropout[a]
    if (A.bias is not None or B.bias is not None or (drop.training and getattr(drop, "p", 0) > 0)
            or not _plain_call(x, rows, base.weight, base.bias, A.weight, B.weight)):
        return orig(x, *args, **kwargs)
    return _decode_product(x, rows, base.weight, base.bias, (A.weight, B.weight, mod.scaling[a]))


@contextlib.contextmanager
def decode_linears(model, lora: bool = True):
    """While decoding on CPU: the model's float32 nn.Linear layers and peft LoRA Linears (over a float32
    nn.Linear) compute as _decode_linear / _decode_lora for calls of up to DECODE_ROWS rows. Quantized layers,
    other devices and dtypes, and other calls keep their own forward. lora=False leaves LoRA layers to peft
    (whose base and adapter linears still take the decode form): bench/rollout.py's breakdown."""
    import functools

    # only a loaded peft makes LoRA layers: a plain base model imports neither it nor, through it, bitsandbytes
    lora_linear = getattr(sys.modules.get("peft.tuners.lora"), "Linear", None) if lora else None
    patched = []
    try:
        for mod in model.modules():
            if lora_linear is not None and type(mod) is lora_linear:
                if type(mod.base_layer) is not torch.nn.Linear:
                    continue
                fast, w = _decode_lora, mod.base_layer.weight
            elif type(mod) is torch.nn.Linear:
                fast, w = _decode_linear, mod.weight
            else:
                continue
            if w.device.type != "cpu" or w.dtype != torch.float32 or "forward" in mod.__dict__:
                continue
            mod.forward = functools.partial(fast, mod, mod.forward)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            del mod.forward
