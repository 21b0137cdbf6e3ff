"""Device, precision and seeds: where a run computes and in what number format.

LoRA's trainable weights and the optimizer state stay fp32 whatever the precision (a small update added to a
bf16 weight would round away); autocast runs the frozen base's matmuls in bf16 or fp16 where that is faster.
"""

import os
import random
from contextlib import nullcontext

import torch

from config import ConfigError



def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu or auto")
    return torch.device(name)



def cpu_has_native_bf16():
    """True where the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and far slower than fp32 (measured 66x slower on an AVX2-only AMD EPYC)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags



def resolve_precision(precision, device):
    """auto -> bf16 on bf16-capable CUDA and on CPUs with native bf16, fp16 on older CUDA, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast needs a GPU; on CPU use precision: bf16 or fp32 (or auto)")
    return precision



def autocast_context(precision, device):
    """Mixed precision for the forward pass; LoRA weights and optimizer state stay fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)



def trainable_to_fp32(model):
    """Upcast what trains (the head, trained biases) on a bf16/fp16 base: like the LoRA weights, small updates
    would vanish in half precision. Autocast then joins them with the half-precision base."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model



def set_seed(seed):
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
