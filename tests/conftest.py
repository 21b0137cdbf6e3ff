"""Tiny random models (seconds, no network) shared by the tests."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

VOCAB = 100


def tiny_bert(num_labels=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def model_output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_lora_B(model, seed=1, std=0.1):
    """Give every B a non-zero value so that LoRA actually changes the model."""
    from lora_linear import lora_layers
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=gen) * std)


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
