"""
Many LoRA adapters on one base model: hot swap, and a different adapter for each row of a batch.

One frozen base model serves every task; each adapter adds only its A and B matrices (and, for
classification, its small head). In every adapted layer the adapters are stacked into one bank:

    A: (n, r_max, in)   B: (n, out, r_max)   s: (n,)        slot 0 is "no adapter" (all zeros)

    swap:        h = W0 x + s_i * B_i A_i x                    (choose i; nothing is copied)
    mixed batch: h[b] = W0 x[b] + s_ids[b] * B_ids[b] A_ids[b] x[b]   for every row b at once:
                 gather A and B per row, two batched matmuls - no Python loop over rows.

This is the idea behind S-LoRA and Punica (serving thousands of adapters on one GPU), in plain PyTorch.
Adapters of different rank share a bank by zero-padding to the largest rank (zeros add nothing).
Merged weights cannot serve several adapters, so they are refused.
"""

import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_linear import (AdapterError, Conv1D, LinearWithLoRA, adapter_target_names, lora_layers, lora_scaling,
                         pattern_value, read_adapter, resolve_modules_to_save)


def _same_base(a, b):
    """Two base model names point to the same model: equal, or the same local folder."""
    if a == b:
        return True
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


class LoRABank(nn.Module):
    """Stand-in for LinearWithLoRA.lora that holds every adapter's update for one layer."""

    def __init__(self, in_features: int, out_features: int, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("A", torch.zeros(1, 1, in_features, device=device))
        self.register_buffer("B", torch.zeros(1, out_features, 1, device=device))
        self.register_buffer("scaling", torch.zeros(1, device=device))
        self.active = 0        # slot used when no per-row choice is set
        self.row_slots = None  # LongTensor (batch,) during a mixed batch

    def add(self, A: Optional[torch.Tensor] = None, B: Optional[torch.Tensor] = None, scaling: float = 0.0) -> None:
        """Append a slot; A (r, in) and B (out, r), or zeros when the adapter skips this layer."""
        n, rank, _ = self.A.shape
        if A is not None and A.shape[0] > rank:  # widen every slot to the new largest rank
            self.A = F.pad(self.A, (0, 0, 0, A.shape[0] - rank))
            self.B = F.pad(self.B, (0, A.shape[0] - rank))
        rank = self.A.shape[1]
        new_A = torch.zeros(1, rank, self.A.shape[2], device=self.A.device)
        new_B = torch.zeros(1, self.B.shape[1], rank, device=self.B.device)
        if A is not None:
            new_A[0, :A.shape[0]] = A
            new_B[0, :, :B.shape[1]] = B
        self.A = torch.cat([self.A, new_A])
        self.B = torch.cat([self.B, new_B])
        self.scaling = torch.cat([self.scaling, torch.tensor([float(scaling)], device=self.scaling.device)])

    def remove(self, slot: int) -> None:
        """Drop a slot; the slots after it move down by one."""
        keep = [i for i in range(self.A.shape[0]) if i != slot]
        self.A, self.B, self.scaling = self.A[keep], self.B[keep], self.scaling[keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s_i B_i A_i x with the active slot i, or during a mixed batch each row's own slot (gathered, two bmm)."""
        x = x.to(self.A.dtype)
        if self.row_slots is None:
            i = self.active
            return F.linear(F.linear(x, self.A[i]), self.B[i]) * self.scaling[i]
        slots = self.row_slots
        flat = x.reshape(x.shape[0], -1, x.shape[-1])              # (batch, tokens, in)
        h = torch.bmm(flat, self.A[slots].transpose(1, 2))          # (batch, tokens, r)
        out = torch.bmm(h, self.B[slots].transpose(1, 2))           # (batch, tokens, out)
        out = out * self.scaling[slots].view(-1, 1, 1)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class HeadBank(nn.Module):
    """Per-adapter classification heads (a Linear each); slot 0 is the base model's own head."""

    def __init__(self, base_head: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight", base_head.weight.detach().clone().unsqueeze(0))
        self.register_buffer("bias", (base_head.bias.detach().clone() if base_head.bias is not None
                                      else torch.zeros(base_head.out_features)).unsqueeze(0))
        self.active, self.row_slots = 0, None

    def add(self, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> None:
        """Append a slot; a saved head (read on the CPU) moves to where the model lives."""
        weight = self.weight[0] if weight is None else weight.to(self.weight)
        bias = self.bias[0] if bias is None else bias.to(self.bias)
        self.weight = torch.cat([self.weight, weight.unsqueeze(0)])
        self.bias = torch.cat([self.bias, bias.unsqueeze(0)])

    def remove(self, slot: int) -> None:
        """Drop a slot; the slots after it move down by one."""
        keep = [i for i in range(self.weight.shape[0]) if i != slot]
        self.weight, self.bias = self.weight[keep], self.bias[keep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The active slot's head, or during a mixed batch each row's own head."""
        if self.row_slots is None:
            return F.linear(x, self.weight[self.active], self.bias[self.active])
        slots = self.row_slots
        return torch.einsum("b...h,blh->b...l", x, self.weight[slots].to(x.dtype)) + \
            self.bias[slots].to(x.dtype).view(x.shape[0], *([1] * (x.dim() - 2)), -1)


class MultiAdapterModel:
    """A frozen base model plus named adapters. Call it like the model; choose with set_adapter / rows."""

    def __init__(self, model: nn.Module, base_model_name_or_path: Optional[str] = None) -> None:
        """base_model_name_or_path: the name adapters record for this base (default: the model's own
        name_or_path); an adapter that names another base is loaded with a warning."""
        if any(layer.merged for _, layer in lora_layers(model)):
            raise RuntimeError("LoRA weights are merged into this model; several adapters need an unmerged base")
        if lora_layers(model):
            raise ValueError("give MultiAdapterModel a bare base model; it wraps the layers itself")
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad = False
        self.names = [None]  # slot 0: no adapter
        self.banks = {}      # layer name -> LoRABank
        self.heads = {}      # module name -> HeadBank
        self.base_name = base_model_name_or_path or getattr(getattr(model, "config", None), "name_or_path", None) or None

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, adapter_dir: str) -> "MultiAdapterModel":
        """Load an adapter saved by this repo or by PEFT under `name` (a non-empty string)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r} (None is the base model)")
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")
        config, state = read_adapter(adapter_dir)
        targets = adapter_target_names(self.model, config)
        heads = resolve_modules_to_save(self.model, config.get("modules_to_save") or [])
        served = {f"{t}.lora.lora_{m}" for t in targets for m in "AB"} | {f"{h}.{p}" for h in heads
                                                                          for p in ("weight", "bias")}
        unserved = sorted(set(state) - served)
        if unserved:  # never dropped silently: the adapter would compute something else than it was trained to
            raise AdapterError(f"adapter {name!r} also holds {', '.join(unserved[:3])}"
                               f"{' ...' if len(unserved) > 3 else ''} (biases trained with bias='all' or "
                               f"'lora_only'?), which one shared base cannot serve per row; load it on its own "
                               f"with lora_linear.load_adapter")
        self._check_shapes(name, state, targets, heads)
        self._check_base(name, config.get("base_model_name_or_path"))
        for layer_name in targets:
            if layer_name not in self.banks:
                self._wrap(layer_name)
        for head in heads:
            if head not in self.heads:
                self._wrap_head(head)
        for layer_name, bank in self.banks.items():
            A, B = state.get(f"{layer_name}.lora.lora_A"), state.get(f"{layer_name}.lora.lora_B")
            rank = pattern_value(config.get("rank_pattern"), layer_name, config["r"])
            alpha = pattern_value(config.get("alpha_pattern"), layer_name, config["lora_alpha"])
            scaling = lora_scaling(rank, alpha, "rslora" if config.get("use_rslora") else "standard")
            bank.add(A, B, scaling if A is not None else 0.0)
        for head_name, bank in self.heads.items():
            bank.add(state.get(f"{head_name}.weight"), state.get(f"{head_name}.bias"))
        self.names.append(name)
        return self

    def _check_shapes(self, name, state, targets, heads):
        modules = dict(self.model.named_modules())
        problems = []
        for layer_name in targets:
            layer = modules[layer_name]
            base = layer.base_layer if isinstance(layer, LinearWithLoRA) else layer
            w = base.weight.shape[::-1] if isinstance(base, Conv1D) else base.weight.shape  # (out, in)
            A, B = state.get(f"{layer_name}.lora.lora_A"), state.get(f"{layer_name}.lora.lora_B")
            if A is None or B is None or A.shape[1] != w[1] or B.shape[0] != w[0]:
                problems.append(layer_name)
        for head in heads:
            bank = self.heads.get(head)
            weight = bank.weight[0] if bank is not None else modules[head].weight
            if head + ".weight" in state and state[head + ".weight"].shape != weight.shape:
                problems.append(head)
        if problems:
            raise AdapterError(f"adapter {name!r} does not fit this base model at {', '.join(problems[:4])}")

    def _check_base(self, name, adapter_base):
        """Shapes can match across different checkpoints of one architecture: compare the recorded base names."""
        if not adapter_base:
            return
        if self.base_name is None:
            self.base_name = adapter_base  # the first adapter that names its base sets what later ones must name
        elif not _same_base(adapter_base, self.base_name):
            warnings.warn(f"adapter {name!r} was trained on {adapter_base!r}, but this base model is "
                          f"{self.base_name!r}; its outputs may be meaningless", stacklevel=3)

    def _wrap(self, layer_name):
        parent_name, _, child = layer_name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        wrapped = LinearWithLoRA(getattr(parent, child), rank=1)
        bank = LoRABank(wrapped.lora.lora_A.shape[1], wrapped.lora.lora_B.shape[0], wrapped.lora.lora_A.device)
        for _ in self.names[1:]:  # adapters loaded earlier do not touch this layer
            bank.add()
        wrapped.lora = bank
        setattr(parent, child, wrapped)
        self.banks[layer_name] = bank

    def _wrap_head(self, head_name):
        head = self.model.get_submodule(head_name)
        if not isinstance(head, nn.Linear):
            raise AdapterError(f"per-adapter heads must be one nn.Linear; {head_name} is {type(head).__name__}")
        bank = HeadBank(head)
        for _ in self.names[1:]:
            bank.add()
        parent_name, _, child = head_name.rpartition(".")
        setattr(self.model.get_submodule(parent_name), child, bank)
        self.heads[head_name] = bank

    def _all_banks(self):
        return list(self.banks.values()) + list(self.heads.values())

    @property
    def active_adapter(self) -> Optional[str]:
        """The adapter set_adapter chose (None: the base alone)."""
        return self.names[self._all_banks()[0].active] if self._all_banks() else None

    def delete_adapter(self, name: Union[str, int]) -> None:
        """Unload adapter `name` (or slot index) from every bank; the base model (slot 0) cannot be deleted."""
        slot = self._slot(name)
        if slot == 0:  # None or 0: the base model itself, which every other slot builds on
            raise ValueError("slot 0 is the base model and cannot be deleted; name a loaded adapter")
        for bank in self._all_banks():
            bank.remove(slot)
            bank.active = 0 if bank.active == slot else bank.active - (bank.active > slot)
        del self.names[slot]

    @property
    def adapters(self) -> List[str]:
        """The loaded adapters' names, in slot order (the base model, slot 0, is not one)."""
        return self.names[1:]

    def _slot(self, name):
        if name is None:
            return 0
        if isinstance(name, int) and not isinstance(name, bool):
            if not 0 <= name < len(self.names):
                raise KeyError(f"adapter index {name} out of range 0..{len(self.names) - 1}")
            return name
        if name not in self.names:
            raise KeyError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        return self.names.index(name)

    def set_adapter(self, name: Union[None, str, int]) -> None:
        """Hot swap: every later call uses adapter `name` (None: the base model alone)."""
        slot = self._slot(name)
        for bank in self._all_banks():
            bank.active = slot
        for layer in self._layers():
            layer.enabled = slot != 0  # the base alone skips the LoRA path entirely

    @contextmanager
    def rows(self, names: Sequence[Union[None, str, int]]) -> Iterator["MultiAdapterModel"]:
        """Inside this block, row b of the batch uses adapter names[b] (a name, an index, or None)."""
        slots = torch.tensor([self._slot(n) for n in names], device=self._device())
        saved = [layer.enabled for layer in self._layers()]
        for bank in self._all_banks():
            bank.row_slots = slots
        for layer in self._layers():
            layer.enabled = True
        try:
            yield self
        finally:
            for bank in self._all_banks():
                bank.row_slots = None
            for layer, enabled in zip(self._layers(), saved):
                layer.enabled = enabled

    def _layers(self):
        for _, layer in lora_layers(self.model):
            if layer.merged:
                raise RuntimeError("LoRA weights were merged; several adapters need an unmerged base")
            yield layer

    def _device(self):
        return next(self.model.parameters()).device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's generate, with the active adapter (or each row's, inside rows())."""
        return self.model.generate(*args, **kwargs)
