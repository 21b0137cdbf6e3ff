"""The chunked causal-LM loss equals the model's own loss and gradients, without the full logits."""
import pytest
import torch

from conftest import BUILDERS, randomize_lora_B
from losses import ChunkedCausalLM
from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_chunked_loss_and_gradients_equal_the_models_own(arch, chunk_size):
    model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS[arch](), None, rank=4))
    randomize_lora_B(model)
    ids = torch.randint(1, 100, (3, 13), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 5:9] = -100  # positions that do not count
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = ChunkedCausalLM(model, chunk_size=chunk_size)(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(ChunkedCausalLM(model, chunk_size)(input_ids=ids, labels=labels).loss,
                                   reference.detach(), rtol=0, atol=1e-6)


def test_a_trainable_head_uses_the_models_own_loss():
    model = BUILDERS["gpt2"]()  # nothing frozen: the head needs its own gradient
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    out = ChunkedCausalLM(model)(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (2, 9, 100)
