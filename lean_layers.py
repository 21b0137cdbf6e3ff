"""Llama-style layers that keep less for backward, with the same forward values.

Training memory is mostly what autograd keeps between forward and backward, and autograd keeps what each
small op of a layer needs for its own backward. Two layers of a Llama block keep more than their math needs:

    RMSNorm   y = w * bf16(x * rsqrt(mean(x^2) + eps)), computed in fp32:
              autograd keeps the fp32 copy of x (4 bytes a feature); here: x as it came (2 in bf16) and
              one rsqrt per position, and backward recomputes x * rsqrt from them.
    SwiGLU    down(silu(gate(x)) * up(x)):
              autograd keeps gate(x), silu(gate(x)) and up(x); here: gate(x) and up(x), and backward
              recomputes silu(gate(x)), one pass.

What each part keeps, with and without these: experiments/results/q7_saved.json; the step's memory and
time: experiments/results/q7_causal_step.json (less memory, the same time).
"""

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Classes whose forward is exactly the formulas above (transformers' Llama, Mistral, Qwen2; SmolLM2 is a
# Llama). Others (Gemma's 1 + w, Cohere's LayerNorm, ...) keep their own forward.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) with transformers' casts, keeping x and rsqrt for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    @once_differentiable  # rstd was saved without history: a second derivative would be wrong, so refuse it
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:  # a trained norm (full fine-tuning); LoRA leaves it frozen
            grad_weight = (grad_out * (x32 * rstd).to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:  # autograd's own steps backward through the forward's ops, in order
            g = (grad_out * weight).to(x.dtype).float()                    # w * (.) and the bf16 cast
            grad_rstd = (g * x32).sum(-1, keepdim=True)                      # x32 * rstd, for rstd
            grad_mean = grad_rstd * -0.5 * rstd.pow(3) / x.shape[-1]         # rsqrt(. + eps), then mean
            grad_x = (g * rstd + grad_mean * 2 * x32).to(x.dtype)           # x32 * rstd for x32, and pow(2)
        return grad_x, grad_weight, None


class _SiluTimesUp(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for backward (not silu(gate) as well)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_out * F.silu(gate)
        if ctx.needs_input_grad[0]:  # the kernel autograd itself calls for silu's backward
            grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_SiluTimesUp.apply(self.gate_proj(x), self.up_proj(x)))


def use_lean_layers(model: nn.Module) -> int:
    """Give the model's RMSNorms and SwiGLU MLPs (RMS_NORMS, SWIGLU_MLPS) the forwards above; returns how
    many modules changed (0 for other architectures: GPT-2, BERT, ...). Parameters and state_dict stay
    as they were: only the modules' forward is replaced, on this model's instances (a bound method: the model
    still deep-copies, but no longer pickles whole; save its state_dict, as this repo does)."""
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if "forward" in vars(module):  # already replaced (by this function, or by a hook library): left alone
            continue
        if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = _rms_norm_forward.__get__(module)
            changed += 1
        elif name in SWIGLU_MLPS and getattr(getattr(module, "config", None), "hidden_act", None) == "silu":
            module.forward = _swiglu_forward.__get__(module)
            changed += 1
    return changed
