"""Device and precision choice, one policy for every torch stage (training, tuning, inference, particles,
baseline): which device a config key names, and the autocast dtype of a precision on it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

__all__ = ["autocast", "autocast_dtype", "resolve_device"]


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device (``key`` names the config key
    in the error when CUDA is asked for and missing)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is {name!r} but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device``; None runs in fp32 without autocast.

    ``auto`` picks bf16 (same range as fp32, no scaler needed) where the GPU supports it, fp16 otherwise,
    and fp32 on CPU, where autocast is slower than fp32 for convolutions.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device`` (from :func:`autocast_dtype`); None runs in fp32 as it is."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
