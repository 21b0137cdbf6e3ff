"""The causal-LM loss without the full logits tensor.

A causal LM's last layer turns each position's hidden state (d numbers) into logits over the whole
vocabulary (V numbers; SmolLM2: d = 576, V = 49,152). At batch 8 x 512 the logits alone are 201M floats:
800 MB in fp32, and the usual loss keeps them, an fp32 copy, the log-softmax and the gradient alive at once.

Here the head and the cross-entropy run on chunks of positions, and each chunk's gradient with respect to
the hidden states, (softmax - one_hot) W, is computed right away, while its logits are at hand. The backward
pass then only scales that stored gradient. Memory holds one chunk of logits instead of all of them, and no
logits are recomputed. The head's weight is frozen in LoRA (the LM head is tied to the embeddings and not
adapted), so no gradient for it is needed; a trainable head, or an architecture that transforms its logits
after the head, falls back to the model's own loss.

On a CPU a chunk holds about CHUNK_ELEMENTS logits (SmolLM2: 85 positions, 16 MB in fp32). With 1,024
positions a chunk the step's peak RSS was 580 MB higher, more than such a chunk holds at once
(experiments/results/q7_causal_step.json); likely, glibc gives blocks that large fresh memory of their own
beside a heap that keeps what the activations free, where small chunks fit into the holes.
"""

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import ModelOutput

IGNORE_INDEX = -100  # labels with this value do not count (transformers' convention)
# Architectures whose logits are exactly lm_head(last hidden state). Others scale or cap them after the head
# (Gemma's softcapping, Cohere's logit_scale, Granite's logits_scaling): they keep their own loss.
PLAIN_HEADS = ("gpt2", "llama", "mistral", "qwen2")
CHUNK_ELEMENTS = 2 ** 22  # logits per chunk: positions = CHUNK_ELEMENTS // vocabulary size


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over counted positions of cross_entropy(hidden @ weight.T, targets), computed chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                want_grad: bool) -> torch.Tensor:
        """The mean loss; with want_grad, each chunk's gradient for `hidden` is stored for backward meanwhile."""
        counted = targets != IGNORE_INDEX
        count = counted.sum().clamp(min=1)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            logits = (hidden[start:end] @ weight.T).float()  # one chunk of (positions x vocab), in fp32
            log_probs = torch.log_softmax(logits, -1)
            rows = torch.arange(end - start, device=hidden.device)
            target, keep = targets[start:end].clamp(min=0), counted[start:end]
            loss_sum -= (log_probs[rows, target] * keep).sum()
            if want_grad:  # d loss_sum / d logits = softmax - one_hot; then back through the head
                probs = log_probs.exp_()
                probs[rows, target] -= 1.0
                probs *= keep[:, None]
                grad[start:end] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        if want_grad:
            ctx.save_for_backward(grad, count)
        return loss_sum / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[torch.Tensor, None, None, None, None]:
        """The stored gradient, scaled; none for the weight (frozen), the targets or the options."""
        grad, count = ctx.saved_tensors
        scale = grad_output.float() / count  # in fp32: a bf16 scale would be off by up to 0.4%
        return (grad.float() * scale).to(grad.dtype), None, None, None, None


def default_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Positions per chunk: on a CPU, CHUNK_ELEMENTS logits' worth; on a GPU, whose caching allocator reuses
    blocks of any size, 1,024 positions (fewer kernel launches, and a smaller graph under torch.compile)."""
    return max(1, CHUNK_ELEMENTS // vocab_size) if device.type == "cpu" else 1024


class ChunkedCausalLM(nn.Module):
    """Wraps a transformers causal LM: forward(input_ids, attention_mask, labels) -> .loss, the mean next-token
    cross-entropy (labels shifted by one position, as the model's own loss does), without the full logits.
    It is an nn.Module so that DistributedDataParallel can wrap it like the model itself."""

    def __init__(self, model: nn.Module, chunk_size: Optional[int] = None) -> None:
        super().__init__()
        self.model, self.chunk_size = model, chunk_size  # None: default_chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **kwargs: Any) -> ModelOutput:
        """CausalLMOutput with .loss only (no logits), computed chunk by chunk. Without labels, with a trainable,
        LoRA-adapted or biased head, or on an architecture outside PLAIN_HEADS: the model's own forward and output."""
        head = self.model.get_output_embeddings()
        if (labels is None or not isinstance(head, nn.Linear) or head.weight.requires_grad  # adapted or trained
                or getattr(head, "bias", None) is not None
                or getattr(self.model.config, "model_type", None) not in PLAIN_HEADS):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                       **kwargs).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts token t + 1
        targets = labels[:, 1:].reshape(-1)
        want_grad = torch.is_grad_enabled() and hidden.requires_grad
        chunk_size = self.chunk_size or default_chunk_size(head.weight.shape[0], hidden.device)
        loss = _ChunkedLinearCrossEntropy.apply(hidden, head.weight, targets, chunk_size, want_grad)
        return CausalLMOutput(loss=loss)
