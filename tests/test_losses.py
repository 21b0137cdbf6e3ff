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


def test_the_default_chunk_size_splits_by_logits_on_a_cpu(monkeypatch):
    import losses
    model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS["llama"](), None, rank=4))
    randomize_lora_B(model)
    assert losses.default_chunk_size(100, torch.device("cpu")) == losses.CHUNK_ELEMENTS // 100
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 500)  # 5 positions a chunk at this vocabulary of 100
    calls = []
    real = losses._ChunkedLinearCrossEntropy.apply
    monkeypatch.setattr(losses._ChunkedLinearCrossEntropy, "apply", lambda *a: calls.append(a[3]) or real(*a))
    ids = torch.randint(1, 100, (2, 13), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ChunkedCausalLM(model)(input_ids=ids, labels=ids).loss,
                               model(input_ids=ids, labels=ids).loss, rtol=0, atol=1e-6)
    assert calls == [5]


def test_a_trainable_head_uses_the_models_own_loss():
    model = BUILDERS["gpt2"]()  # nothing frozen: the head needs its own gradient
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    out = ChunkedCausalLM(model)(input_ids=ids, labels=ids)
    assert out.logits is not None and out.logits.shape == (2, 9, 100)


def test_a_lora_adapted_lm_head_uses_the_models_own_loss_and_trains():
    # PEFT allows lm_head as a target; the chunked loss reads the head's plain weight, which would skip B A
    model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS["gpt2"](), ["c_attn", "lm_head"], rank=4))
    randomize_lora_B(model)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    out = ChunkedCausalLM(model)(input_ids=ids, labels=ids)
    assert out.logits is not None  # the model's own forward, through the adapted head
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss)
    out.loss.backward()
    assert model.lm_head.lora.lora_A.grad.abs().sum() > 0


def test_under_bf16_autocast_the_chunked_loss_stays_close_to_the_models_own():
    model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS["llama"](), None, rank=4))
    randomize_lora_B(model)
    ids = torch.randint(1, 100, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids, labels=ids).loss.float()
        chunked = ChunkedCausalLM(model, chunk_size=5)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(chunked, reference, rtol=0, atol=0.02)  # bf16 rounds logits differently


def test_a_model_that_transforms_its_logits_keeps_its_own_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=3.0)).eval()
    mark_only_lora_as_trainable(apply_lora_to_model(model, None, rank=2))
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    out = ChunkedCausalLM(model)(input_ids=ids, labels=ids)
    assert out.logits is not None  # softcapped logits: the model's own forward and loss
    torch.testing.assert_close(out.loss, model(input_ids=ids, labels=ids).loss)
