"""
Hand-written LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685).

A frozen pretrained weight W0 (out x in) gets a trainable low-rank update B A (Section 4.1):

                 +-----------------+
   x (*, in) --->|  W0  (frozen)   |-----------------------------+
        |        +-----------------+                             |
        |                                                        v
        +--> dropout --> A (r x in) --> B (out x r) --> * s --> (+) --> h (*, out)

   h = W0 x + s * B A x        s = alpha / r   (rsLoRA: alpha / sqrt(r);  or 1)

   A starts Kaiming-uniform, B starts at zero, so B A = 0 and the model starts exactly as pretrained.
   Trainable parameters per layer: r * (in + out) instead of in * out.
   For deployment B A is folded into W0 (merge): no extra latency (Section 4.1, "No Additional Inference Latency").

The whole API is a few verbs:
   apply_lora_to_model -> mark_only_lora_as_trainable -> (train) -> save_adapter / load_adapter
   merge_lora_weights / unmerge_lora_weights / merge_and_unload, count_lora_parameters.
Adapters are written in the Hugging Face PEFT format (adapter_config.json + adapter_model.safetensors),
so PEFT, vLLM and the Hub can read them, and adapters trained with PEFT load here.
"""

import json
import math
import os
import re
import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # GPT-2 stores its projections as Conv1D with weight (in, out); only needed to recognise it.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - lora_linear works with torch alone
    class Conv1D(nn.Module):
        pass

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
SCALING_MODES = ("standard", "rslora", "none")
B_INITS = ("zeros", "kaiming")
BIAS_MODES = ("none", "all", "lora_only")
HEAD_NAMES = ("classifier", "score")  # sequence-classification heads: new and random, so they must train

# The attention projections W_q, W_k, W_v, W_o (Section 4.2) by one generic name on every architecture.
# Llama, Mistral, Qwen2 and ViT already use these names. A (layer, part, parts) entry is one slice of a
# fused projection: GPT-2 computes q, k and v with a single c_attn (768 -> 3 x 768), so "q_proj" on GPT-2
# is the first third of c_attn's output, as in loralib's MergedLinear(enable_lora=[True, False, True]).
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
ROLE_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_BERT_ROLES = {"q_proj": "query", "k_proj": "key", "v_proj": "value", "o_proj": "attention.output.dense"}
ROLE_LAYERS = {
    "bert": _BERT_ROLES, "roberta": _BERT_ROLES, "xlm-roberta": _BERT_ROLES, "electra": _BERT_ROLES,
    "distilbert": {"q_proj": "q_lin", "k_proj": "k_lin", "v_proj": "v_lin", "o_proj": "out_lin"},
    "gpt2": {"q_proj": ("c_attn", 0, 3), "k_proj": ("c_attn", 1, 3), "v_proj": ("c_attn", 2, 3),
             "o_proj": "attn.c_proj"},
}
DEFAULT_ROLES = ("q_proj", "v_proj")  # the paper adapts W_q and W_v (Section 7.1)
# GPT-2 defaults to its whole c_attn, the course's count (294,912 parameters at r=8 on GPT-2 small, as for
# the q and v thirds, with k adapted too). Pass q_proj v_proj for the paper's exact setup.
DEFAULT_TARGETS = {"gpt2": ("c_attn",)}


class AdapterError(ValueError):
    """An adapter file or config that cannot be used with this model."""


# ----------------------------------------------------------------------------- the low-rank update

def lora_scaling(rank: int, alpha: float, scaling_mode: str = "standard") -> float:
    """s in h = W0 x + s B A x: alpha / r (the paper), alpha / sqrt(r) (rsLoRA), or 1.

    Section 4.1 scales by alpha / r so that one alpha (and learning rate) serves several ranks; rsLoRA
    (Kalajdzievski 2023) shows that alpha / r slows learning at large r and divides by sqrt(r) instead.
    """
    return {"standard": alpha / rank, "rslora": alpha / math.sqrt(rank), "none": 1.0}[scaling_mode]


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tuple[torch.Tensor, float]:
    """Which inputs dropout keeps (bools), and the scale 1 / P(kept) for those kept. On a CPU from random 16-bit
    integers compared with a threshold, four from each 64-bit draw of the generator, which runs on one thread
    (torch.rand takes a 32-bit draw a float; SmolLM2's 8 x 512 x 576 inputs: 2.8 instead of 4.8 ms). p is then
    resolved to 2^-16 (0.05 becomes 0.050003), and the scale is that p's: E[dropout(x)] = x exactly."""
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p, 1.0 / (1.0 - p)
    count = math.prod(shape)
    bits = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None).view(torch.int16)[:count]
    dropped = min(round(p * 2 ** 16), 2 ** 16 - 1)  # of the 2^16 values; capped: p near 1 must not wrap around
    return (bits >= dropped - 2 ** 15).view(shape), 2 ** 16 / (2 ** 16 - dropped)  # bits uniform on [-2^15, 2^15)


def _kept(t: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Inverted dropout with a given mask: t * scale where kept, else 0."""
    return torch.where(keep, t * scale, 0)


class _DropoutThenA(torch.autograd.Function):
    """A dropout(x), (*, in) -> (*, n*r), keeping for backward only x and a one-byte mask.

    Autograd would keep dropout(x) (A's gradient needs it) and a mask of x's size in x's dtype, for every LoRA
    layer. This keeps x, shared by the LoRA layers that read it, and a bool mask, and rebuilds dropout(x) with
    one multiply. SmolLM2 with LoRA on q_proj and v_proj, fp32 (experiments/results/q7_saved.json): the LoRA layers
    kept 8.91 of the 37.55 KB kept per token and layer; with this, 3.44 (x alone: 2.31)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = _keep_mask(x.shape, p, x.device)
        dropped = _kept(x, keep, scale)
        autocast = torch.is_autocast_enabled(x.device.type)  # autocast runs the matmul in bf16 anyway
        ctx.compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast else A.dtype
        ctx.scale = scale
        ctx.save_for_backward(x, keep, A)
        return F.linear(dropped if autocast else dropped.to(A.dtype), A)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, keep, A = ctx.saved_tensors
        grad_out = grad_out.to(ctx.compute_dtype)
        grad_x = grad_A = None
        if ctx.needs_input_grad[0]:
            grad_x = _kept((grad_out @ A.to(ctx.compute_dtype)).to(x.dtype), keep, ctx.scale)
        if ctx.needs_input_grad[1]:
            dropped = _kept(x, keep, ctx.scale).to(ctx.compute_dtype)  # the forward's dropout(x), bit for bit
            grad_A = (grad_out.reshape(-1, grad_out.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(A.dtype)
        return grad_x, grad_A, None


class LoRALayer(nn.Module):
    """The update alone: x -> s * B(A(dropout(x))). Section 4.1 of the paper.

    parts (fused projections only): which equal slices of the output get an update, e.g. (True, False, True)
    for the q and v thirds of GPT-2's c_attn. Each enabled slice has its own rank-r pair (A_i, B_i), stacked
    as A (n*r, in) and B (n*out/parts, r); the disabled slices get exactly zero, so their output is the base's.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 init_B: str = "zeros", scaling_mode: str = "standard", device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, parts: Optional[Sequence[bool]] = None) -> None:
        super().__init__()
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if init_B not in B_INITS or scaling_mode not in SCALING_MODES:
            raise ValueError(f"init_B must be one of {B_INITS} and scaling_mode one of {SCALING_MODES}, "
                             f"got {init_B!r}, {scaling_mode!r}")
        self.rank, self.alpha, self.init_B, self.scaling_mode = rank, float(alpha), init_B, scaling_mode
        self.scaling = lora_scaling(rank, alpha, scaling_mode)
        self.parts = tuple(parts) if parts is not None else None
        enabled = sum(self.parts) if self.parts else 1
        if self.parts and (out_features % len(self.parts) or not enabled):
            raise ValueError(f"parts {parts} must split {out_features} outputs evenly and enable at least one")
        self.out_features, self.part_size = out_features, out_features // len(self.parts or (1,))
        self.lora_A = nn.Parameter(torch.empty(enabled * rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(enabled * self.part_size, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A random, B zero (Section 4.1), so B A = 0 and training starts exactly from the pretrained model.

        The paper draws A from a Gaussian; A is Kaiming-uniform here, as in loralib and PEFT. init_B="kaiming"
        is the ablation: a random B, so the model no longer starts as pretrained."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear does for its weight
        if self.init_B == "zeros":
            nn.init.zeros_(self.lora_B)  # B A = 0: training starts from the pretrained function
        else:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))  # the ablation: a random start

    def _fill_parts(self, pieces, zeros):
        """Place the enabled slices' outputs in order, exact zeros in the disabled ones."""
        pieces = iter(pieces)
        return torch.cat([next(pieces) if on else zeros for on in self.parts], dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, shape (out, in): what merging adds to W0 (the update Delta W = B A of Section 4.1)."""
        if self.parts is None:
            return self.scaling * (self.lora_B @ self.lora_A)
        pieces = [B @ A for A, B in zip(self.lora_A.split(self.rank), self.lora_B.split(self.part_size))]
        zeros = self.lora_A.new_zeros(self.lora_A.shape[1], self.part_size)
        return self.scaling * self._fill_parts([p.T for p in pieces], zeros).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A dropout(x), (*, in) -> (*, out): the low-rank path of h = W0 x + s B A x (Section 4.1)."""
        if self.training and isinstance(self.dropout, nn.Dropout):  # A dropout(x), keeping less for backward
            after_A = _DropoutThenA.apply(x, self.lora_A, self.dropout.p)
        else:  # no dropout (eval mode, or p = 0)
            if not torch.is_autocast_enabled(x.device.type):  # autocast runs the matmul in bf16 anyway
                x = x.to(self.lora_A.dtype)
            after_A = F.linear(x, self.lora_A)
        if self.parts is None:
            return F.linear(after_A, self.lora_B) * self.scaling
        pieces = [F.linear(a, B) for a, B in zip(after_A.split(self.rank, -1), self.lora_B.split(self.part_size))]
        return self._fill_parts(pieces, after_A.new_zeros(*after_A.shape[:-1], self.part_size)) * self.scaling

    # PEFT has no partial fused layers: it stores one dense LoRA of rank n*r whose B is zero outside the
    # enabled blocks, with alpha chosen so that its scaling equals ours. The function is the same.
    def peft_rank_alpha(self, use_rslora: bool) -> Tuple[int, float]:
        """(r, lora_alpha) under which PEFT's scaling rule (alpha/sqrt(r) if use_rslora, else alpha/r) gives
        this layer's s."""
        rank = self.rank * (sum(self.parts) if self.parts else 1)
        if not self.parts and self.scaling_mode == ("rslora" if use_rslora else "standard"):
            return rank, self.alpha
        return rank, self.scaling * (math.sqrt(rank) if use_rslora else rank)

    def peft_B(self) -> torch.Tensor:
        """B as PEFT stores it: (out, n*r), block k of columns feeding the k-th enabled slice."""
        if self.parts is None:
            return self.lora_B
        dense = self.lora_B.new_zeros(self.out_features, self.lora_A.shape[0])
        slots = [i for i, on in enumerate(self.parts) if on]
        for k, (i, B) in enumerate(zip(slots, self.lora_B.split(self.part_size))):
            dense[i * self.part_size:(i + 1) * self.part_size, k * self.rank:(k + 1) * self.rank] = B
        return dense

    @torch.no_grad()
    def load_peft_B(self, dense: torch.Tensor) -> torch.Tensor:
        """The inverse of peft_B; refuses a B with updates outside the enabled blocks."""
        if self.parts is None:
            return self.lora_B.copy_(dense)
        outside, blocks = dense.clone(), []
        slots = [i for i, on in enumerate(self.parts) if on]
        for k, i in enumerate(slots):
            rows, cols = slice(i * self.part_size, (i + 1) * self.part_size), slice(k * self.rank, (k + 1) * self.rank)
            blocks.append(dense[rows, cols])
            outside[rows, cols] = 0
        if torch.count_nonzero(outside):  # checked before anything is written: a refused adapter changes nothing
            raise AdapterError("the adapter updates slices of a fused layer that this model keeps frozen "
                               "(e.g. GPT-2's k third of c_attn); apply it with the same target_modules")
        return self.lora_B.copy_(torch.cat(blocks))


class LinearWithLoRA(nn.Module):
    """A frozen nn.Linear (or GPT-2 Conv1D) plus a LoRALayer: forward = base(x) + lora(x).

    Wraps the existing layer in place (no copy of W0). Conv1D stores its weight as (in, out), so merging
    adds the transpose of B A; the adapter itself keeps the same (r, in) / (out, r) orientation.
    """

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 init_B: str = "zeros", scaling_mode: str = "standard", parts: Optional[Sequence[bool]] = None) -> None:
        super().__init__()
        if isinstance(base_layer, Conv1D):
            in_features, out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Linear):
            in_features, out_features = base_layer.in_features, base_layer.out_features
        else:
            raise TypeError(f"LoRA wraps nn.Linear or transformers Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        for p in base_layer.parameters():
            p.requires_grad = False
        weight = base_layer.weight
        # LoRA weights stay at least fp32 even on a half-precision base: small updates vanish in bf16.
        self.lora = LoRALayer(in_features, out_features, rank, alpha, dropout, init_B, scaling_mode,
                              device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32),
                              parts=parts)
        self.merged = False
        self.enabled = True  # False: the base layer alone (see lora_disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """h = W0 x + s B A x (Section 4.1, Figure 1); merged (B A inside W0) or disabled, the base layer alone."""
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out  # merged: B A already lives inside W0
        return out + self.lora(x).to(out.dtype)

    @torch.no_grad()
    def _add_to_base(self, sign: int) -> None:
        """W += sign * s B A, added in (at least) fp32 and rounded to W's dtype once."""
        weight, delta = self.base_layer.weight, self.lora.delta_weight().detach()
        delta = delta.T if self.fan_in_fan_out else delta
        wide = torch.promote_types(weight.dtype, delta.dtype)
        weight.copy_((weight.to(wide) + sign * delta.to(wide)).to(weight.dtype))

    def merge_weights(self) -> None:
        """W = W0 + s B A in place: the layer then costs what the plain layer costs (Section 4.1, "No Additional
        Inference Latency"). Merging twice would add B A twice: skipped with a warning."""
        if self.merged:
            warnings.warn("LoRA weights are already merged; merging again would add B A twice, skipped")
            return
        self._add_to_base(+1)
        self.merged = True

    def unmerge_weights(self) -> None:
        """W0 = W - s B A: recover W0 to train on or to switch to another adapter (Section 4.1). In fp32 W0 comes
        back up to float rounding; a bf16 or fp16 W was rounded when merged, so W0 comes back only approximately
        (as in PEFT): keep the unmerged model where exactness matters."""
        if not self.merged:
            warnings.warn("LoRA weights are not merged; nothing to unmerge")
            return
        self._add_to_base(-1)
        self.merged = False


# ----------------------------------------------------------------------------- model surgery

def lora_layers(model: nn.Module) -> List[Tuple[str, LinearWithLoRA]]:
    """(name, LinearWithLoRA) for every wrapped layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearWithLoRA)]


def _classifier_names(model):
    """Module names of a sequence-classification head ('classifier', 'score'): new, trained in full."""
    return {n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)}


def _inside(name: str, modules) -> bool:
    """True if module `name` is one of `modules` or inside one of them."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _head_names(model):
    """Module names of the output head: the LM head and classification heads (never adapted by 'all')."""
    names = _classifier_names(model)
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    names.update(n for n, m in model.named_modules() if out_emb is not None and m is out_emb)
    return names


def _matches(name, target):
    """PEFT's rule: the full dotted name equals the target or ends with '.' + target. Never a substring."""
    return name == target or name.endswith("." + target)


def _model_type(model):
    return getattr(getattr(model, "config", None), "model_type", None)


def _role_layers(model):
    return ROLE_LAYERS.get(_model_type(model), {})


def default_targets(model: nn.Module) -> List[str]:
    """What target_modules=None adapts: W_q and W_v (by role), or the architecture's own default.

    Section 7.1: with a fixed parameter budget, adapting W_q and W_v together did at least as well as any one
    weight type alone."""
    return list(DEFAULT_TARGETS.get(_model_type(model), DEFAULT_ROLES))


def resolve_targets(model: nn.Module,
                    target_modules: Union[None, str, Sequence[str]] = None) -> Dict[str, Optional[Tuple[bool, ...]]]:
    """{layer name: parts or None}: which layers get LoRA, and for a fused layer which slices (else None).

    target_modules: None (default_targets: W_q and W_v, the paper's choice; GPT-2: all of c_attn), 'all'
    (every Linear/Conv1D but the output head), a regex string over the full name (as PEFT reads a string), or a
    list of names. A name is a role
    (q_proj, k_proj, v_proj, o_proj, or q, k, v, o), resolved to this architecture's layer, or a layer name
    matched by PEFT's exact name-or-suffix rule.
    """
    wrapped = {n for n, _ in lora_layers(model)}
    inside_wrapper = {n + ".base_layer" for n in wrapped}
    linears = [n for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, Conv1D)) and n not in inside_wrapper]
    if target_modules in ("all", "all-linear"):
        heads = _head_names(model)
        return {n: None for n in linears if not _inside(n, heads)}
    modules = dict(model.named_modules())
    if isinstance(target_modules, str):  # PEFT reads a string as a regex over the full name
        found = [n for n in modules if re.fullmatch(target_modules, n)]
        targets, per_target = [target_modules], {target_modules: [(n, None) for n in found]}
    else:
        targets = list(default_targets(model) if target_modules is None else target_modules)
        roles, per_target = _role_layers(model), {}
        for t in targets:
            layer = roles.get(ROLE_ALIASES.get(t, t), ROLE_ALIASES.get(t, t))
            name, part, parts = layer if isinstance(layer, tuple) else (layer, None, None)
            per_target[t] = [(n, (part, parts) if part is not None else None) for n in modules if _matches(n, name)]
            if not per_target[t] and name != t:  # a model whose layers are literally named q, v, ... (T5)
                per_target[t] = [(n, None) for n in modules if _matches(n, t)]
    leaf_names = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in sorted(wrapped) + linears))
    for t in targets:
        if not per_target[t]:
            raise ValueError(f"target module {t!r} matches no layer. Roles (any model): {', '.join(ROLES)} "
                             f"(or q, k, v, o) and all; layer names in this model: {', '.join(leaf_names)}")
    selected = {}  # name -> set of slices, or None for the whole layer
    for t in targets:
        for name, slice_ in per_target[t]:
            if slice_ is None or selected.get(name, set()) is None:
                selected[name] = None
            else:
                selected.setdefault(name, set()).add(slice_)
    bad = [f"{n} ({type(modules[n]).__name__})" for n in selected
           if n not in wrapped and not isinstance(modules[n], (nn.Linear, Conv1D))]
    if bad:
        raise ValueError(f"LoRA wraps only Linear/Conv1D layers, but target_modules also match: "
                         f"{', '.join(bad[:5])}. Name the projections instead: {', '.join(leaf_names)}")
    classifiers = _classifier_names(model)
    heads = [n for n in selected if _inside(n, classifiers)]
    for name in heads:  # a new classification head trains in full (modules_to_save): PEFT skips it as a target too
        del selected[name]
    if heads and not selected:
        before = dict.fromkeys(n.rsplit(".", 1)[-1] for n in sorted(wrapped) + linears if not _inside(n, classifiers))
        raise ValueError(f"target_modules match only the classification head ({', '.join(heads)}), which trains "
                         f"in full anyway; name layers before it: {', '.join(before)}")
    resolved = {}
    for name, slices in selected.items():
        if slices is None or len(slices) == next(iter(slices))[1]:  # every slice: the plain layer
            resolved[name] = None
        else:
            resolved[name] = tuple(any(i == p for p, _ in slices) for i in range(next(iter(slices))[1]))
    return resolved


def find_target_modules(model: nn.Module, target_modules: Union[None, str, Sequence[str]] = None) -> List[str]:
    """The names of the layers that target_modules selects (see resolve_targets)."""
    return list(resolve_targets(model, target_modules))


def apply_lora_to_model(model: nn.Module, target_modules: Union[None, str, Sequence[str]] = None, rank: int = 8,
                        alpha: float = 16.0, dropout: float = 0.0, init_B: str = "zeros",
                        scaling_mode: str = "standard", rank_pattern: Optional[Dict[str, int]] = None,
                        alpha_pattern: Optional[Dict[str, float]] = None) -> nn.Module:
    """Replace the target layers of `model` by LinearWithLoRA, in place, and return the model.

    Section 4.2 adapts only the attention weights (W_q, W_k, W_v, W_o) and freezes the MLP; the default targets
    are W_q and W_v (Section 7.1; see default_targets), and any other Linear can be named too.
    target_modules: see resolve_targets. Layers already wrapped are left as they are.
    rank_pattern / alpha_pattern: {layer name or its ending: value} overrides per layer, as in PEFT.
    """
    targets = resolve_targets(model, target_modules)
    wrapped = dict(lora_layers(model))
    for name, parts in targets.items():
        if name in wrapped:
            if wrapped[name].lora.parts != parts:  # e.g. q_proj, then v_proj, on GPT-2's one c_attn
                raise ValueError(f"{name} is already adapted on other slices ({wrapped[name].lora.parts}); "
                                 f"name all of a fused layer's targets in one apply_lora_to_model call")
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        r, a = pattern_value(rank_pattern, name, rank), pattern_value(alpha_pattern, name, alpha)
        setattr(parent, child, LinearWithLoRA(getattr(parent, child), r, a, dropout, init_B, scaling_mode, parts))
    # Remember what was done: saving an adapter needs it (PEFT's adapter_config.json).
    model.lora_config = {"r": rank, "lora_alpha": float(alpha), "lora_dropout": float(dropout),
                         "target_modules": _compact_targets(model), "use_rslora": scaling_mode == "rslora",
                         "scaling_mode": scaling_mode, "init_B": init_B,
                         "bias": getattr(model, "lora_config", {}).get("bias", "none"),
                         "modules_to_save": getattr(model, "lora_config", {}).get("modules_to_save")}
    return model


def pattern_value(patterns: Optional[Dict[str, float]], layer_name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern rule: the first key that matches the end of the layer name
    (a regular expression, at a dot boundary) gives the value; no match gives the default."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", layer_name):
            return value
    return default


def _compact_targets(model):
    """Leaf names of the wrapped layers when they select exactly those layers, else the full names."""
    wrapped = [n for n, _ in lora_layers(model)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    selected = [n for n, _ in model.named_modules() if any(_matches(n, leaf) for leaf in leaves)]
    return leaves if sorted(selected) == sorted(wrapped) else wrapped


def resolve_modules_to_save(model: nn.Module, names: Union[None, str, Sequence[str]]) -> List[str]:
    """Full names of the modules that `names` select, by PEFT's rule for modules_to_save: a module is selected
    when its full dotted name ends with one of the names, as a plain string suffix (so 'classifier' also
    selects DistilBERT's 'pre_classifier', as in PEFT). Modules inside a selected one are not listed again."""
    names = [names] if isinstance(names, str) else list(names or [])
    found = []
    for full, _ in model.named_modules():
        if full and any(full.endswith(n) for n in names) and not any(full.startswith(f + ".") for f in found):
            found.append(full)
    return found


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none",
                                modules_to_save: Union[None, str, Sequence[str]] = None) -> nn.Module:
    """Freeze everything except LoRA weights, the chosen biases and `modules_to_save` (W0 frozen: Section 4.1).

    modules_to_save=None keeps a sequence-classification head ('classifier', 'score') trainable: it is
    new and randomly initialised, and a frozen random head cannot learn. Pass [] to freeze it too.
    Names are matched as PEFT matches them (see resolve_modules_to_save).
    """
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if modules_to_save is None:
        heads = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
        modules_to_save = resolve_modules_to_save(model, heads) if heads else []
    else:
        requested = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
        modules_to_save = resolve_modules_to_save(model, requested)
        unmatched = [n for n in requested if not any(m.endswith(n) for m in modules_to_save)]
        if unmatched:
            raise ValueError(f"modules_to_save {unmatched} match no module of this model")
    for name, param in model.named_parameters():
        param.requires_grad = ".lora.lora_" in "." + name
    for name in modules_to_save:
        for param in model.get_submodule(name).parameters():
            param.requires_grad = True
    if bias != "none":
        owners = [m for _, m in lora_layers(model)] if bias == "lora_only" else [model]
        for owner in owners:
            for name, param in owner.named_parameters():
                if name.endswith("bias"):
                    param.requires_grad = True
    if hasattr(model, "lora_config"):
        model.lora_config.update(bias=bias, modules_to_save=list(modules_to_save) or None)
    return model


def count_lora_parameters(model: nn.Module) -> Dict[str, float]:
    """Parameter counts; `total` counts every parameter once, LoRA included."""
    params = list(model.parameters())  # shared (tied) parameters appear once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    lora = sum(p.numel() for _, m in lora_layers(model) for p in m.lora.parameters())
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "lora": lora,
            "percentage": 100.0 * trainable / total if total else 0.0}


def merge_lora_weights(model: nn.Module) -> nn.Module:
    """Fold every layer's B A into its W0 (Section 4.1: no additional inference latency); returns the model."""
    for _, layer in lora_layers(model):
        layer.merge_weights()
    return model


def unmerge_lora_weights(model: nn.Module) -> nn.Module:
    """Subtract every layer's B A again (Section 4.1: W0 recovered, to train on or swap adapters); returns the model."""
    for _, layer in lora_layers(model):
        layer.unmerge_weights()
    return model


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside this block (e.g. to compare with the adapter)."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("LoRA weights are merged into the base; unmerge them before disabling LoRA")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every B A into W0 and put the plain layers back: a standard model for save_pretrained."""
    for name, layer in lora_layers(model):
        if not layer.merged:
            layer.merge_weights()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ----------------------------------------------------------------------------- state and files

def get_lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What an adapter holds: LoRA A and B, plus the saved modules (head) and trained biases."""
    config = getattr(model, "lora_config", {})
    keep = [m + "." for m in (config.get("modules_to_save") or [])]
    bias = config.get("bias", "none")
    lora_owners = [n + "." for n, _ in lora_layers(model)]
    state = {}
    for name, layer in lora_layers(model):  # B as PEFT stores it (dense for a fused layer)
        state[f"{name}.lora.lora_A"], state[f"{name}.lora.lora_B"] = layer.lora.lora_A.detach(), layer.lora.peft_B().detach()
    for name, param in model.named_parameters():
        if name in state:
            continue
        if (".lora.lora_" in "." + name or any(name.startswith(k) for k in keep)
                or (bias == "all" and name.endswith("bias"))
                or (bias == "lora_only" and name.endswith("bias") and any(name.startswith(o) for o in lora_owners))):
            state[name] = param.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Strict load: missing, unexpected or wrong-shaped keys raise an AdapterError that names them."""
    expected = get_lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: adapter {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatch", wrong)) if keys]
    if problems:
        raise AdapterError("adapter does not fit this model; " + "; ".join(problems)
                           + ". Was it trained on a different base model or LoRA config?")
    fused = {f"{n}.lora.lora_B": layer.lora for n, layer in lora_layers(model) if layer.lora.parts}
    with torch.no_grad():
        for name, value in state.items():
            if name in fused:
                fused[name].load_peft_B(value)
            else:
                expected[name].copy_(value)
    return model


def _to_peft_key(name):
    return "base_model.model." + re.sub(r"\.lora\.lora_([AB])$", r".lora_\1.weight", name)


def _from_peft_key(key):
    name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return re.sub(r"\.lora_([AB])(\.default)?\.weight$", r".lora.lora_\1", name)


def write_atomically(path: str, write: Callable[[str], Any]) -> str:
    """write(temporary path), then rename it to `path`: readers see the old file or the new one, never half of
    one (a rename within a folder is atomic). The repo's one way of writing a result file."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
    return path


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# PEFT's task types, by the transformers class that serves each (the auto-class mapping) or its name ending
TASK_TYPES = (("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "ForSequenceClassification", "SEQ_CLS"),
              ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "ForTokenClassification", "TOKEN_CLS"),
              ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "ForQuestionAnswering", "QUESTION_ANS"),
              ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
              ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "ForCausalLM", "CAUSAL_LM"),
              ("MODEL_MAPPING_NAMES", "Model", "FEATURE_EXTRACTION"))


def infer_task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task_type for this model, from its class (as PeftModelFor... would be chosen); None if unknown.

    A sequence classifier is SEQ_CLS whether or not its head was marked trainable, a GPT-2 LMHeadModel is
    CAUSAL_LM, a bare encoder FEATURE_EXTRACTION. A plain torch module has no PEFT task: None (PEFT's default).
    """
    classes = [c.__name__ for c in type(model).__mro__]  # a subclass of a known class counts as that class
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - lora_linear works with torch alone
        modeling_auto = None
    known = {}
    for mapping_name, _, task in TASK_TYPES:
        for value in getattr(modeling_auto, mapping_name, {}).values() if modeling_auto else ():
            for name in (value,) if isinstance(value, str) else value:
                known.setdefault(name, task)
    for name in classes:
        if name in known:
            return known[name]
        for _, ending, task in TASK_TYPES[:-1]:  # a class the auto mappings do not list
            if name.endswith(ending):
                return task
        if name.endswith("LMHeadModel"):
            return "CAUSAL_LM"
    return None


def save_adapter(model: nn.Module, output_dir: str, base_model_name_or_path: Optional[str] = None,
                 task_type: Optional[str] = None) -> str:
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors; returns output_dir."""
    from safetensors.torch import save_file
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("this model has no LoRA layers: call apply_lora_to_model first")
    if task_type is None:
        task_type = infer_task_type(model)
    os.makedirs(output_dir, exist_ok=True)
    tensors = {_to_peft_key(k): v.detach().to("cpu").contiguous() for k, v in get_lora_state_dict(model).items()}
    # Scaling 'none' (s = 1) and fused slices have no PEFT spelling; peft_rank_alpha gives the r and alpha
    # under which PEFT's own rule computes the same s.
    layers = lora_layers(model)
    ranks = {n: layer.lora.peft_rank_alpha(config["use_rslora"])[0] for n, layer in layers}
    alphas = {n: float(layer.lora.peft_rank_alpha(config["use_rslora"])[1]) for n, layer in layers}
    # The most common rank and alpha are the defaults; layers that differ (a per-layer budget) are listed
    # by full name in PEFT's rank_pattern / alpha_pattern.
    rank, alpha = (Counter(v.values()).most_common(1)[0][0] for v in (ranks, alphas))
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "r": rank, "lora_alpha": alpha,
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "lora_dropout": config["lora_dropout"], "target_modules": config["target_modules"],
        "modules_to_save": config.get("modules_to_save"), "bias": config.get("bias", "none"),
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "use_rslora": config["use_rslora"], "init_lora_weights": True, "use_dora": False,
        "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
    }
    write_atomically(os.path.join(output_dir, ADAPTER_WEIGHTS_NAME),
                      lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_atomically(os.path.join(output_dir, ADAPTER_CONFIG_NAME),
                      lambda p: _write_text(p, json.dumps(peft_config, indent=2) + "\n"))
    return output_dir


ADAPTER_BIN_NAME = "adapter_model.bin"  # what older PEFT (and torch.save) wrote
# PEFT LoRA options that change the computation in ways this file does not implement: refused, never ignored
UNSUPPORTED_OPTIONS = ("use_dora", "layers_to_transform", "lora_bias", "layer_replication", "megatron_config",
                       "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora",
                       "arrow_config")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_pattern(path, key, patterns, valid, expected):
    """rank_pattern / alpha_pattern: {regular expression: value}, as PEFT writes them."""
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        raise AdapterError(f"{path}: {key} must be an object {{layer name: value}}, got {patterns!r}")
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise AdapterError(f"{path}: {key} key {pattern!r} is not a valid regular expression ({e})") from None
        if not valid(value):
            raise AdapterError(f"{path}: {key}[{pattern!r}] is {value!r}; expected {expected}")


def check_adapter_config(config: dict, path: str = ADAPTER_CONFIG_NAME) -> dict:
    """Raise AdapterError naming the first value of a LoRA adapter_config that cannot be applied here."""
    def bad(key, expected):
        shown = repr(config[key]) if key in config else "missing"
        raise AdapterError(f"{path}: {key} is {shown}; expected {expected}. Re-save the adapter or fix the file")

    if not _is_rank(config.get("r")):
        bad("r", "a positive integer (the LoRA rank)")
    if not (_is_number(config.get("lora_alpha")) and config["lora_alpha"] > 0):
        bad("lora_alpha", "a number > 0")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout < 1):
        bad("lora_dropout", "a number in [0, 1)")
    targets = config.get("target_modules")
    if not ((isinstance(targets, str) and targets)
            or (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))):
        bad("target_modules", "a list of module names or a regular expression string")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error:
            bad("target_modules", "a valid regular expression")
    excluded = config.get("exclude_modules")
    if excluded is not None and not (isinstance(excluded, str) or (
            isinstance(excluded, list) and all(isinstance(t, str) and t for t in excluded))):
        bad("exclude_modules", "a list of module names or a regular expression string")
    _check_pattern(path, "rank_pattern", config.get("rank_pattern"), _is_rank, "a positive integer")
    _check_pattern(path, "alpha_pattern", config.get("alpha_pattern"), lambda v: _is_number(v) and v > 0,
                   "a number > 0")
    if config.get("bias") not in (None,) + BIAS_MODES:
        bad("bias", "one of " + ", ".join(BIAS_MODES))
    saved = config.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        bad("modules_to_save", "a list of module names or null")
    if config.get("use_rslora") not in (None, True, False):
        bad("use_rslora", "true or false")
    for key in ("base_model_name_or_path", "task_type"):
        if config.get(key) is not None and not isinstance(config[key], str):
            bad(key, "a string or null")
    unsupported = [k for k in UNSUPPORTED_OPTIONS if config.get(k)]
    if unsupported:
        raise AdapterError(f"{path} uses {', '.join(unsupported)}, which this hand-written LoRA does not implement")
    return config


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json as a dict, checked to be a LoRA config this file can apply (else AdapterError)."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(path):
        raise AdapterError(f"no {ADAPTER_CONFIG_NAME} in {adapter_dir}: point to a folder written by "
                           f"save_adapter or PEFT's save_pretrained")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); re-save the adapter") from e
    except OSError as e:
        raise AdapterError(f"{path} cannot be read ({e.strerror or e})") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{path} is not a LoRA config (peft_type={found!r}); only LoRA adapters load here")
    return check_adapter_config(config, path)


def _read_weights(adapter_dir):
    """The adapter's tensors by their file keys: adapter_model.safetensors, else an older adapter_model.bin read
    with torch.load(weights_only=True), which rebuilds tensors and containers only and never runs pickled code."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    if os.path.isfile(weights):
        try:
            return weights, load_file(weights)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{weights} is truncated or corrupt ({e}); re-save or re-download it") from e
    weights = os.path.join(adapter_dir, ADAPTER_BIN_NAME)
    if not os.path.isfile(weights):
        raise AdapterError(f"no {ADAPTER_WEIGHTS_NAME} (or older {ADAPTER_BIN_NAME}) in {adapter_dir}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, or a pickle that asks for code (refused by weights_only)
        raise AdapterError(f"{weights} cannot be read as tensors ({type(e).__name__}): it is truncated, corrupt or "
                           f"pickles other objects, which are never unpickled here; re-save the adapter") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise AdapterError(f"{weights} does not hold a {{name: tensor}} state dict; re-save the adapter")
    return weights, state


def read_adapter(adapter_dir: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config, state): the checked config and the weights under this file's parameter names."""
    config = read_adapter_config(adapter_dir)
    weights, tensors = _read_weights(adapter_dir)
    state = {}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            # e.g. a run that diverged: loading it would only print nan scores
            raise AdapterError(f"{weights} holds non-finite values (nan or inf) in {key}; it cannot be used")
        name = _from_peft_key(key)
        if ".original_module." in name:  # PEFT's frozen copy of a saved module (it writes it with bias="all")
            continue
        state[re.sub(r"\.modules_to_save(\.default)?\.", ".", name)] = value  # PEFT's trained copy: the module
    return config, state


def adapter_target_names(model: nn.Module, config: dict) -> List[str]:
    """Full names of the layers an adapter config adapts in `model`, with PEFT's rules: target_modules (names
    matched exactly or as a dotted suffix, a regular expression string, or all-linear), less exclude_modules."""
    try:
        names = find_target_modules(model, config["target_modules"])
    except ValueError as e:
        raise AdapterError(f"adapter does not fit this model: {e}") from None
    excluded = config.get("exclude_modules")
    if excluded:
        names = [n for n in names if not (re.fullmatch(excluded, n) if isinstance(excluded, str)
                                          else any(_matches(n, e) for e in excluded))]
        if not names:
            raise AdapterError("exclude_modules removes every target of the adapter")
    return names


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Apply the adapter in `adapter_dir` to `model` (a bare base model or one already LoRA-wrapped).

    Raises AdapterError for anything that keeps the adapter from loading: a bad config value, missing or
    corrupt weights, or weights that do not fit this model.
    """
    if not isinstance(model, nn.Module):
        raise AdapterError(f"load_adapter needs the base model (a torch nn.Module), got {type(model).__name__}")
    config, state = read_adapter(adapter_dir)
    if not lora_layers(model):
        targets = adapter_target_names(model, config)
        apply_lora_to_model(model, targets, config["r"], config["lora_alpha"],
                            config.get("lora_dropout") or 0.0,
                            scaling_mode="rslora" if config.get("use_rslora") else "standard",
                            rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"))
        mark_only_lora_as_trainable(model, config.get("bias") or "none",
                                    resolve_modules_to_save(model, config.get("modules_to_save") or []))
    else:  # already wrapped: the shapes are checked on loading, the scaling s here (a silent error otherwise)
        mode = "rslora" if config.get("use_rslora") else "standard"
        for name, layer in lora_layers(model):
            wanted = lora_scaling(pattern_value(config.get("rank_pattern"), name, config["r"]),
                                  pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]), mode)
            if not math.isclose(wanted, layer.lora.scaling, rel_tol=1e-6):
                raise AdapterError(f"the adapter scales {name} by {wanted:g}, this model's LoRA layer by "
                                   f"{layer.lora.scaling:g} (another alpha, rank or use_rslora); load it into "
                                   f"the bare base model")
    return load_lora_state_dict(model, state)
