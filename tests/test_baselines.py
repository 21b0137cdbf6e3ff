"""The hand-written baselines of experiments/baselines.py on a tiny random BERT (seconds each)."""
import os
import sys

import pytest
import torch

from conftest import tiny_bert

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from baselines import PrefixSelfAttention, add_prefix_tuning  # noqa: E402

IMPLEMENTATIONS = ["eager", "sdpa"]  # additive float mask and boolean mask: both must be extended right
TOKENS = 5
IDS = torch.tensor([[2, 11, 12, 13, 3, 0, 0], [2, 21, 22, 23, 24, 25, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])  # two padded positions in the first row


def prefix_bert(implementation="sdpa", tokens=TOKENS):
    model = tiny_bert()
    model.set_attn_implementation(implementation)
    return add_prefix_tuning(model, num_virtual_tokens=tokens)


def test_prefix_tuning_trains_the_prefixes_and_the_head_only():
    model = prefix_bert()
    config = model.config
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    head = config.hidden_size * config.num_labels + config.num_labels
    assert sum(trainable.values()) == config.num_hidden_layers * 2 * TOKENS * config.hidden_size + head
    assert all(n.endswith(("prefix_key", "prefix_value")) or n.startswith("classifier.") for n in trainable)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_prefix_attention_is_the_attention_over_prefix_and_tokens_written_out(implementation):
    """One layer against softmax(q [P_k; K]^T / sqrt(d) + mask) [P_v; V], padded keys masked, prefix never."""
    from transformers.masking_utils import create_bidirectional_mask
    model = prefix_bert(implementation)
    layer = model.bert.encoder.layer[0].attention.self
    assert isinstance(layer, PrefixSelfAttention)
    hidden = torch.randn(*IDS.shape, model.config.hidden_size)
    mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=MASK)
    with torch.no_grad():
        out, _ = layer(hidden, attention_mask=mask)

        attention, (batch, length) = layer.wrapped, IDS.shape

        def heads(x):
            return x.view(batch, length, attention.num_attention_heads, -1).transpose(1, 2)
        q = heads(attention.query(hidden))
        k = torch.cat([layer.prefix_key.expand(batch, -1, -1, -1), heads(attention.key(hidden))], dim=2)
        v = torch.cat([layer.prefix_value.expand(batch, -1, -1, -1), heads(attention.value(hidden))], dim=2)
        keep = torch.cat([torch.ones(batch, TOKENS, dtype=torch.bool), MASK.bool()], dim=1)
        scores = (q @ k.transpose(-1, -2)) / attention.attention_head_size ** 0.5
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_an_empty_prefix_is_the_base_model(implementation):
    base = tiny_bert()
    base.set_attn_implementation(implementation)
    with torch.no_grad():
        expected = base.bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
        got = prefix_bert(implementation, tokens=0).bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_padding_still_cannot_reach_real_tokens(implementation):
    model = prefix_bert(implementation)
    other = IDS.clone()
    other[0, 5:] = torch.tensor([40, 41])  # different ids at the padded positions
    with torch.no_grad():
        a = model.bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
        b = model.bert(input_ids=other, attention_mask=MASK).last_hidden_state
    real = MASK.bool()
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-6)
    assert not torch.allclose(a[~real], b[~real])  # the change did reach the model


def test_gradients_reach_the_prefixes_and_the_head_not_the_base():
    model = prefix_bert()
    model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1])).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    prefixes = [n for n, p in model.named_parameters() if n.endswith(("prefix_key", "prefix_value"))]
    assert len(prefixes) == 2 * model.config.num_hidden_layers
