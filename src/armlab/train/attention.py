"""Causal attention with a sliding window: FlashAttention 3 where it runs, SDPA elsewhere.

Follows nanochat 92d63d4's nanochat/flash_attention.py:
- On CUDA, FlashAttention 3 is loaded through the `kernels` package (Hugging Face kernel hub):
  `varunneal/flash-attention-3` on Hopper (sm90), `kernels-community/flash-attn3` on other
  GPUs when it has a build for them. It runs only in bf16; fp32/fp16 use SDPA. The kernel is
  fetched from the hub on first use (or the local HF cache, e.g. on an offline GPU node);
  `ARMLAB_FA3=0` turns the attempt off.
- Otherwise (CPU, older GPUs, no `kernels`): F.scaled_dot_product_attention, with
  `is_causal=True` for a full-context layer and an explicit boolean band mask (causal and at
  most `window` tokens back) for a sliding-window layer. Same numbers as FA3 up to kernel
  rounding; slower for windows, since SDPA cannot skip the masked blocks.

Tensors are (B, T, H, D), FA3's layout. `window` is the left window in tokens: a query at
position i attends to keys i - window .. i (window >= T means full causal attention).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F


def _load_fa3() -> Any:
    """FA3's `flash_attn_interface` through the kernels hub, or None (nanochat's detection)."""
    if os.environ.get("ARMLAB_FA3", "1") == "0" or not torch.cuda.is_available():
        return None
    try:
        major, _ = torch.cuda.get_device_capability()
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from kernels import get_kernel, has_kernel

        if major == 9:  # the varunneal build is the faster one on Hopper
            return get_kernel("varunneal/flash-attention-3").flash_attn_interface
        name = "kernels-community/flash-attn3"
        return get_kernel(name).flash_attn_interface if has_kernel(name) else None
    except Exception:  # no kernels package, no network and no cache, no build for this GPU
        return None


_FA3 = _load_fa3()
HAS_FA3 = _FA3 is not None


def backend(dtype: torch.dtype, device: torch.device | str) -> str:
    """'fa3' or 'sdpa': what `attend` uses for tensors of this dtype on this device."""
    return "fa3" if HAS_FA3 and torch.device(device).type == "cuda" and dtype == torch.bfloat16 else "sdpa"


_MASKS: dict[tuple[int, int, str], torch.Tensor] = {}


def _band_mask(T: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, T) bool: key j is visible from query i iff i - window <= j <= i (cached per shape)."""
    key = (T, window, str(device))
    mask = None if torch.compiler.is_compiling() else _MASKS.get(key)  # compiled: built in the graph
    if mask is None:
        row = torch.arange(T, device=device).unsqueeze(1)
        col = torch.arange(T, device=device).unsqueeze(0)
        mask = (col <= row) & ((row - col) <= window)
        if not torch.compiler.is_compiling():
            _MASKS[key] = mask
    return mask


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal self-attention of (B, T, H, D) tensors with a left window of `window` tokens."""
    if backend(q.dtype, q.device) == "fa3":
        return _FA3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if window < 0 or window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_band_mask(T, window, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)
