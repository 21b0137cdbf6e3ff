"""The methods LoRA is compared with in discussion.md, written out like lora_linear.py so they can be read.

- Houlsby adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", Section 2.1): a
  bottleneck (down-projection to m dimensions, nonlinearity, up-projection, skip connection) after the attention
  output projection and after the feed-forward output of every layer, before the residual and LayerNorm; the up
  projection starts at zero so training starts from the pretrained model; adapters, LayerNorms and the head train.
- Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", Section 4.2), as
  P-tuning v2 (Liu et al. 2022, Section 3.2) and PEFT's prefix tuning apply it to an encoder classifier: learned
  keys and values for a few virtual tokens, prepended to every layer's self-attention; prefix and head train.
- Magnitude pruning and int8 quantization of a (merged) model: the usual ways to shrink a model after training,
  against which Q8 sets merging.
- Importance-driven rank allocation during training (AdaLoRA's idea, Zhang et al. 2023, Section 3.2-3.3): every
  layer starts at a larger rank; at steps in the schedule each rank component's importance (the sensitivity
  |w * grad w| of its A row and B column, smoothed) is ranked across all layers and the least important
  components are masked until the total budget is reached.
"""

import io
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_linear import lora_layers


class HoulsbyAdapter(nn.Module):
    """output = h + up(gelu(down(h))), h = the wrapped layer's output (Houlsby et al. 2019, Figure 2)."""

    def __init__(self, wrapped: nn.Linear, bottleneck: int):
        super().__init__()
        self.wrapped = wrapped
        self.down = nn.Linear(wrapped.out_features, bottleneck)
        self.up = nn.Linear(bottleneck, wrapped.out_features)
        nn.init.normal_(self.down.weight, std=1e-2)  # near-identity start (the paper's Section 3.6)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wrapped(x)
        return h + self.up(F.gelu(self.down(h)))


def add_houlsby_adapters(model: nn.Module, bottleneck: int = 8) -> nn.Module:
    """Two adapters per BERT layer (after attention.output.dense and output.dense); train the adapters, every
    LayerNorm and the classification head, freeze the rest."""
    for param in model.parameters():
        param.requires_grad = False
    targets = [name for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.endswith(("attention.output.dense", ".output.dense"))
               and ".layer." in name]
    _wrap(model, targets, lambda layer: HoulsbyAdapter(layer, bottleneck))
    for name, module in model.named_modules():
        if isinstance(module, (HoulsbyAdapter, nn.LayerNorm)) or name == "classifier":
            for param_name, param in module.named_parameters():
                if not param_name.startswith("wrapped."):
                    param.requires_grad = True
    return model


def _wrap(model: nn.Module, names: List[str], wrapper) -> None:
    """Replace each named submodule by wrapper(submodule)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, wrapper(getattr(parent, child)))


class PrefixSelfAttention(nn.Module):
    """The wrapped self-attention over [prefix; tokens]: `num_virtual_tokens` learned keys and values per head,
    attended to by every real token (Li & Liang 2021, Section 4.2: the prefix's activations, free parameters).

    The hook is the one transformers gives every attention for past keys and values: BertSelfAttention computes
    its keys and values, passes them to cache.update(), and attends to what that returns. This module is that
    cache: it returns [prefix; keys], [prefix; values], a past that never grows, and the attention itself
    (scaling, dropout, eager or sdpa) stays transformers' own. The mask it is given covers the real keys only,
    so the prefix's columns are put in front: attended to by every query, while padded keys stay masked.
    """

    def __init__(self, wrapped: nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.wrapped = wrapped
        shape = (wrapped.num_attention_heads, num_virtual_tokens, wrapped.attention_head_size)
        # N(0, 1), as PEFT's prefix encoder (an nn.Embedding) starts: the prefix changes the model from step 0
        self.prefix_key = nn.Parameter(torch.randn(shape))
        self.prefix_value = nn.Parameter(torch.randn(shape))

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        if cache is not None:
            raise ValueError("prefix tuning here is for encoders: no decoding cache")
        if attention_mask is not None:  # None: no padding, every query attends to every key, prefix included
            # (batch, 1, queries, keys): additive floats for eager (0 = attend), booleans for sdpa (True = attend)
            shape = (*attention_mask.shape[:-1], self.prefix_key.shape[1])
            attend = (attention_mask.new_zeros(shape) if attention_mask.is_floating_point()
                      else attention_mask.new_ones(shape))
            attention_mask = torch.cat([attend, attention_mask], dim=-1)
        return self.wrapped(hidden_states, attention_mask=attention_mask, cache=self, **kwargs)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx, **kwargs):
        """Called by the wrapped attention with its (batch, heads, tokens, head size) keys and values."""
        def prepend(prefix, states):
            return torch.cat([prefix.to(states.dtype).expand(states.shape[0], -1, -1, -1), states], dim=2)
        return prepend(self.prefix_key, key), prepend(self.prefix_value, value)


def add_prefix_tuning(model: nn.Module, num_virtual_tokens: int = 20) -> nn.Module:
    """A prefix in every BERT self-attention; train the prefixes and the classification head (as PEFT's SEQ_CLS
    does), freeze the rest. The prefixes are trained directly, without Li & Liang's reparameterisation MLP
    (Section 4.3): P-tuning v2 (Section 3.3) finds it helps or not depending on the task for NLU, PEFT leaves
    it off by default, and without it the trainable parameters are the prefix itself (layers x 2 x tokens x
    hidden)."""
    for param in model.parameters():
        param.requires_grad = False
    targets = [name for name, _ in model.named_modules() if name.endswith("attention.self")]
    _wrap(model, targets, lambda attention: PrefixSelfAttention(attention, num_virtual_tokens))
    for param in model.get_submodule("classifier").parameters():
        param.requires_grad = True
    return model  # the new prefix parameters are trainable by default


def magnitude_prune(model: nn.Module, fraction: float) -> nn.Module:
    """Zero the `fraction` smallest-magnitude weights of every Linear layer (per layer, unstructured), in place."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.data
            k = int(fraction * weight.numel())
            if k:
                threshold = weight.abs().flatten().kthvalue(k).values
                weight[weight.abs() <= threshold] = 0
    return model


def int8_dynamic(model: nn.Module) -> nn.Module:
    """Linear weights stored as int8 and activations quantized on the fly (torch's dynamic quantization)."""
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as torch.save writes it: int8 weights take one byte each, pruned
    weights still take their dense size (zeros stored as zeros; a sparse format would be a separate step)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


class RankAllocator:
    """AdaLoRA-style budget: mask LoRA rank components of low importance across layers during training.

    Every adapted layer starts at rank r_start; between start_step and end_step the number of active components
    falls linearly (cubically in AdaLoRA; linear here, for readability) from the total start rank to `budget`.
    A component i of a layer is A[i, :] and B[:, i]; its importance is the smoothed sensitivity |p * dL/dp|
    summed over both (AdaLoRA's Eq. 8-10 without the uncertainty term). Masked components are zeroed and their
    gradients dropped, so they stay off.
    """

    def __init__(self, model: nn.Module, budget: int, start_step: int, end_step: int, beta: float = 0.85):
        self.layers = dict(lora_layers(model))
        self.budget, self.start_step, self.end_step, self.beta = budget, start_step, end_step, beta
        self.importance = {name: torch.zeros(layer.lora.rank) for name, layer in self.layers.items()}
        self.mask = {name: torch.ones(layer.lora.rank, dtype=torch.bool) for name, layer in self.layers.items()}
        self.total_start = sum(layer.lora.rank for layer in self.layers.values())

    def observe(self) -> None:
        """Before the optimizer step: update each component's smoothed sensitivity from the current gradients."""
        for name, layer in self.layers.items():
            a, b = layer.lora.lora_A, layer.lora.lora_B
            if a.grad is None or b.grad is None:
                continue
            score = (a * a.grad).abs().sum(1) + (b * b.grad).abs().sum(0)
            self.importance[name] = self.beta * self.importance[name] + (1 - self.beta) * score.detach().cpu()

    def target(self, step: int) -> int:
        if step < self.start_step:
            return self.total_start
        progress = min(1.0, (step - self.start_step) / max(1, self.end_step - self.start_step))
        return round(self.total_start - progress * (self.total_start - self.budget))

    def reallocate(self, step: int) -> None:
        """Keep the `target(step)` most important components across all layers; zero the others."""
        keep = self.target(step)
        scores = sorted(((float(s), name, i) for name, values in self.importance.items()
                         for i, s in enumerate(values) if self.mask[name][i]), reverse=True)
        for _, name, i in scores[keep:]:
            self.mask[name][i] = False
        with torch.no_grad():
            for name, layer in self.layers.items():
                off = ~self.mask[name]
                layer.lora.lora_A[off] = 0
                layer.lora.lora_B[:, off] = 0

    def drop_masked_gradients(self) -> None:
        for name, layer in self.layers.items():
            off = ~self.mask[name]
            if layer.lora.lora_A.grad is not None:
                layer.lora.lora_A.grad[off] = 0
                layer.lora.lora_B.grad[:, off] = 0

    def ranks(self) -> Dict[str, int]:
        return {name: int(mask.sum()) for name, mask in self.mask.items()}


def layer_ranks_by_kind(ranks: Dict[str, int]) -> Dict[str, List[int]]:
    """{'query': [ranks by layer], 'value': [...]} for a readable table."""
    kinds: Dict[str, List[int]] = {}
    for name, rank in ranks.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(rank)
    return kinds
