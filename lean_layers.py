"""Llama-style layers that keep less for backward, and causal attention that computes fewer masked scores on a CPU.

Training memory is mostly what autograd keeps between forward and backward, and autograd keeps what each
small op of a layer needs for its own backward. Two layers of a Llama block keep more than their math needs:

    RMSNorm   y = w * bf16(x * rsqrt(mean(x^2) + eps)), computed in fp32:
              autograd keeps the fp32 copy of x (4 bytes a feature); here: x as it came (2 in bf16) and
              one rsqrt per position, and backward recomputes x * rsqrt from them.
    SwiGLU    down(silu(gate(x)) * up(x)):
              autograd keeps gate(x), silu(gate(x)) and up(x); here: gate(x) and up(x), and backward
              recomputes silu(gate(x)), one pass.

What each part keeps, with and without these: experiments/results/q7_saved.json.

A causal LM's attention also computes more than its math needs, on a CPU: torch's flash-attention kernel goes
through the keys in blocks of up to 512 and skips only whole blocks above the diagonal. A sequence of 512
positions is one key block, so the kernel computes all 512 x 512 scores and then masks the future half.
causal_attention_in_halves splits the queries in two: the first half attends only the first half of the keys
(causal), the second half all keys under a mask; a quarter of the scores is not computed. The same math, with
the values apart by float rounding. With grouped-query attention (SmolLM2: 9 query heads share 3 key/value
heads), the query heads that share a key/value head are stacked into one longer column of queries, so that the
kernel takes them 256 at a time instead of 64: its backward makes five small matrix products per block of
queries, and fewer, larger blocks are faster. The step's memory and time with each of these:
experiments/results/q7_causal_step.json.
"""

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Classes whose forward is exactly the formulas above (transformers' Llama, Mistral, Qwen2; SmolLM2 is a
# Llama). Others (Gemma's 1 + w, Cohere's LayerNorm, ...) keep their own forward.
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
CPU_KEY_BLOCK = 512  # keys per block of torch's CPU flash attention (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp)
# Below 384 positions a half has fewer than 192 queries, which the kernel takes 32 at a time instead of 64: the
# two calls then cost more than the scores they skip
MIN_HALVED_LENGTH = 384
WIDE_QUERY_BLOCK_ROWS = 768  # from this many queries on, the kernel takes 256 a block instead of 64 (or 32)
HALVED_ATTENTION = "sdpa_causal_halves"  # the attention implementation's name in transformers' registry


class _RMSNorm(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x^2) + eps)) with transformers' casts, keeping x and rsqrt for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        # (x32 * rstd).to(x.dtype) in one pass: out= rounds the fp32 product once, as .to() would
        normed = torch.mul(x32, rstd, out=torch.empty_like(x))
        return normed.mul_(weight) if torch.result_type(weight, normed) == normed.dtype else weight * normed

    @staticmethod
    @once_differentiable  # rstd was saved without history: a second derivative would be wrong, so refuse it
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, weight, rstd = ctx.saved_tensors
        x32 = x.to(torch.float32, copy=True)  # a copy of its own: it is overwritten below
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:  # a trained norm (full fine-tuning); LoRA leaves it frozen
            grad_weight = (grad_out * (x32 * rstd).to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:  # autograd's own steps backward through the forward's ops, in order
            # the same ops and roundings in fewer passes: casts fused into out=, products in place
            g = torch.mul(grad_out, weight, out=torch.empty_like(x)).float()  # w * (.) and the bf16 cast
            grad_rstd = (g * x32).sum(-1, keepdim=True)                       # x32 * rstd, for rstd
            grad_mean = grad_rstd * -0.5 * rstd.pow(3) / x.shape[-1]          # rsqrt(. + eps), then mean
            # g * rstd + grad_mean * 2 * x32: x32 * rstd for x32, and pow(2)
            grad_x = torch.add(g.mul_(rstd), x32.mul_(grad_mean * 2), out=torch.empty_like(x))
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


def causal_attention_in_halves(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                               scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                               **kwargs: Any) -> Tuple[torch.Tensor, None]:
    """transformers' sdpa attention, with the queries in two halves where that computes fewer scores: on a
    CPU, causal, unpadded (no mask), no attention dropout, MIN_HALVED_LENGTH to CPU_KEY_BLOCK positions.
    Anything else: transformers' own sdpa_attention_forward."""
    length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (query.device.type != "cpu" or attention_mask is not None or dropout or not causal
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or key.shape[2] != length or not MIN_HALVED_LENGTH <= length <= CPU_KEY_BLOCK):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    half = length // 2
    group = query.shape[1] // key.shape[1]  # query heads per key/value head (grouped-query attention: > 1)
    # query i sees keys 0 .. i: the first half of the queries the first half of the keys, the second half all
    sees = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
    if group * half >= WIDE_QUERY_BLOCK_ROWS:  # stacked: (batch, kv heads, group x queries, dim), masks repeated
        parts = ((slice(0, half), half), (slice(half, None), length))  # (query rows, keys they may see)
        halves = [_attend_stacked(query[:, :, rows], key[:, :, :keys], value[:, :, :keys], sees[rows, :keys],
                                  scaling, group) for rows, keys in parts]
    else:
        halves = [F.scaled_dot_product_attention(query[:, :, :half], key[:, :, :half], value[:, :, :half],
                                                 is_causal=True, scale=scaling, enable_gqa=group > 1),
                  F.scaled_dot_product_attention(query[:, :, half:], key, value, attn_mask=sees[half:],
                                                 scale=scaling, enable_gqa=group > 1)]
    return torch.cat(halves, 2).transpose(1, 2).contiguous(), None  # (batch, positions, heads, dim)


def _attend_stacked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sees: torch.Tensor,
                    scaling: Optional[float], group: int) -> torch.Tensor:
    """sdpa of query (batch, heads, n, dim) on key/value (batch, heads // group, keys, dim) under the boolean
    mask `sees` (n x keys), with the `group` query heads of each key/value head stacked into one sequence of
    group x n queries (head h uses key/value head h // group, as transformers' repeat_kv has it)."""
    batch, heads, n, dim = query.shape
    out = F.scaled_dot_product_attention(query.reshape(batch, heads // group, group * n, dim), key, value,
                                         attn_mask=sees.repeat(group, 1), scale=scaling)
    return out.view(batch, heads, n, dim)


ALL_ATTENTION_FUNCTIONS.register(HALVED_ATTENTION, causal_attention_in_halves)
ALL_MASK_ATTENTION_FUNCTIONS.register(HALVED_ATTENTION, sdpa_mask)  # the masks sdpa gets (None when unpadded)


def use_lean_layers(model: nn.Module) -> int:
    """Give the model's RMSNorms and SwiGLU MLPs (RMS_NORMS, SWIGLU_MLPS) the forwards above, and switch a
    decoder-only LM from sdpa to causal_attention_in_halves; returns how many norms and MLPs changed (0 for
    other architectures: GPT-2, BERT, ...). Parameters and state_dict stay as they were. The norms and MLPs
    change on this model's instances (a bound method: the model still deep-copies, but no longer pickles
    whole; save its state_dict, as this repo does); the attention changes in model.config, which a model
    built from the same config object shares (transformers does not save this setting)."""
    config = model.config
    if config._attn_implementation == "sdpa" and model.can_generate() and not config.is_encoder_decoder:
        model.set_attn_implementation(HALVED_ATTENTION)  # a decoder-only LM: its self-attention is causal
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
