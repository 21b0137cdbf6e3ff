"""Device, precision and seeds: where a run computes and in what number format.

LoRA's trainable weights and the optimizer state stay fp32 whatever the precision (a small update added to a
bf16 weight would round away); autocast runs the frozen base's matmuls in bf16 or fp16 where that is faster.
"""

import ctypes
import os
import platform
import random
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Optional, Tuple

import torch

from config import ConfigError



def pick_device(name: str = "auto") -> torch.device:
    """The device a run computes on: auto takes CUDA, then Apple's MPS, then the CPU; a device that was asked for
    but is not there is a ConfigError (never a silent fall back to the CPU)."""
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



# glibc's malloc gives freed memory back to the OS: blocks above M_MMAP_THRESHOLD at once, the heap's free top
# above M_TRIM_THRESHOLD. A training step frees its activations (gigabytes for a causal LM) and allocates them
# again in the next one, and every page handed back is page-faulted in again. These keep it for reuse.
# mallopt's parameter numbers (malloc.h) and values: 32 MiB is the most M_MMAP_THRESHOLD takes on 64-bit Linux.
MALLOC_SETTINGS = {"M_TRIM_THRESHOLD": (-1, 2 ** 30), "M_TOP_PAD": (-2, 2 ** 28), "M_MMAP_THRESHOLD": (-3, 2 ** 25)}


def keep_freed_memory_for_reuse() -> bool:
    """Set MALLOC_SETTINGS in this process's glibc malloc; False where the C library is not glibc (macOS,
    Windows, musl). A SmolLM2 step at 8 x 512 (experiments/results/q7_causal_step.json): 3,240 page faults
    instead of 133,894, 0.14 s of system time instead of 0.41, the same peak RSS (freed memory is reused, not
    kept beside new)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return all(libc.mallopt(number, value) == 1 for number, value in MALLOC_SETTINGS.values())


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and far slower than fp32 (one bert-base-sized product: 114.8x, benchmarks/RESULTS.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags



def native_half_precision(device: torch.device) -> Optional[str]:
    """The half precision this device computes natively, if any: bf16 on CUDA that has it (fp16 on older
    CUDA) and on CPUs with AVX512-BF16 or AMX; None elsewhere (a CPU without them emulates bf16, far slower)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """The hardware rule: auto -> the device's native half precision, else fp32. choose_precision refines auto
    by timing the job's own steps."""
    if precision == "auto":
        return native_half_precision(device) or "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast needs a GPU; on CPU use precision: bf16 or fp32 (or auto)")
    return precision


# auto takes the half precision only when it is clearly faster. A near tie goes to fp32, which is exact and makes
# the same run every time: on a small step, timing noise alone is a few tens of percent.
HALF_PRECISION_MARGIN = 0.9


def choose_precision(precision: str, device: torch.device,
                     seconds_per_step: Optional[Callable[[str], float]] = None) -> Tuple[str, str]:
    """(precision, why). A set precision is used as it is. auto: fp32 where the device has no native half
    precision; otherwise, given seconds_per_step(candidate), the half precision where it takes at most
    HALF_PRECISION_MARGIN of fp32's time on the job's own steps, else fp32 (half precision is not always faster:
    small GPU batches wait on kernel launches, and autocast adds a cast per weight per step); without
    seconds_per_step, the half precision."""
    if precision != "auto":
        return resolve_precision(precision, device), "set in the config"
    half = native_half_precision(device)
    if half is None:
        return "fp32", f"auto: {device.type} has no native half precision"
    if seconds_per_step is None:
        return half, f"auto: {half} is native on {device.type}"
    times = {candidate: seconds_per_step(candidate) for candidate in ("fp32", half)}
    measured = ", ".join(f"{c} {t * 1000:.0f} ms" for c, t in times.items())
    if times[half] <= HALF_PRECISION_MARGIN * times["fp32"]:
        return half, f"auto: the faster on this job's longest batch ({measured} per step)"
    return "fp32", (f"auto: fp32, as {half} was not at least {1 - HALF_PRECISION_MARGIN:.0%} faster on this job's "
                    f"longest batch ({measured} per step)")


def autocast_context(precision: str, device: torch.device) -> AbstractContextManager:
    """Mixed precision for the forward pass; LoRA weights and optimizer state stay fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)



def trainable_to_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Upcast what trains (the head, trained biases) on a bf16/fp16 base: like the LoRA weights, small updates
    would vanish in half precision. Autocast then joins them with the half-precision base."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model



def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device), so that LoRA's A, the new head and the
    dropout masks are the same in every run with this seed."""
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seconds_per_training_step(model: torch.nn.Module, batch: dict, precision: str, device: torch.device,
                              repeats: int = 2, min_seconds: float = 0.3, max_repeats: int = 30) -> float:
    """The fastest of at least `repeats` forward + backward passes on `batch` (after one warm-up), more while
    they add up to under min_seconds (a millisecond step needs many to be timed reliably), leaving no trace:
    gradients are cleared and the random state (dropout masks) is put back, so a run that measured first
    trains exactly like one that did not."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    times = []
    for i in range(max_repeats + 1):
        if i > repeats and sum(times) >= min_seconds:
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast_context(precision, device):
            loss = model(**batch).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first pass warms up allocators and kernels
            times.append(time.perf_counter() - start)
    for param in model.parameters():
        param.grad = None
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return min(times)


def cast_frozen_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Store the frozen floating-point weights in `dtype` (what base_dtype: bf16 loads), leaving what trains in
    fp32: under bf16 autocast the matmuls read bf16 weights anyway, and storing them so halves their memory
    and saves a cast per weight per step."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    return model
