"""PEFT's documented semantics beyond the basic round trip: task_type from the model class, modules_to_save
matched by suffix (DistilBERT's pre_classifier), exclude_modules, and older adapter_model.bin files."""
import json

import pytest
import torch
from conftest import BUILDERS, VOCAB, model_output, randomize_lora_B

from lora_linear import (apply_lora_to_model, get_lora_state_dict, infer_task_type, load_adapter, lora_layers,
                         mark_only_lora_as_trainable, resolve_modules_to_save, save_adapter)

peft = pytest.importorskip("peft")


def tiny_distilbert(seed=0):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(seed)
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)).eval()


def other_heads(model):
    """The same base with other random heads: an adapter that misses one head then gives other logits."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for head in (model.pre_classifier, model.classifier):
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen))
    return model


def test_task_type_comes_from_the_model_class(tmp_path):
    # no mark_only_lora_as_trainable: the head is not in modules_to_save, yet the task is classification
    model = apply_lora_to_model(BUILDERS["bert"](), ["query"], rank=2)
    save_adapter(model, tmp_path / "cls")
    assert json.loads((tmp_path / "cls" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert infer_task_type(BUILDERS["gpt2"]()) == infer_task_type(BUILDERS["llama"]()) == "CAUSAL_LM"
    assert infer_task_type(tiny_distilbert()) == "SEQ_CLS"
    from transformers import BertConfig, BertForTokenClassification, BertModel
    small = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64)
    assert infer_task_type(BertForTokenClassification(small)) == "TOKEN_CLS"
    assert infer_task_type(BertModel(small)) == "FEATURE_EXTRACTION"
    assert infer_task_type(torch.nn.Linear(2, 2)) is None


def test_modules_to_save_match_by_suffix_like_peft():
    model = tiny_distilbert()
    assert resolve_modules_to_save(model, ["classifier"]) == ["pre_classifier", "classifier"]
    mark_only_lora_as_trainable(apply_lora_to_model(model, ["q_lin", "v_lin"], rank=2))
    assert model.lora_config["modules_to_save"] == ["pre_classifier", "classifier"]
    assert {k for k in get_lora_state_dict(model) if "classifier" in k} == {
        "pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}


def test_peft_distilbert_classifier_loads_here_with_pre_classifier(ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")
    peft_model = peft.get_peft_model(tiny_distilbert(), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    expected = model_output(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(other_heads(tiny_distilbert()), tmp_path).eval()  # the adapter must set both heads
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)
    from multi_lora import MultiAdapterModel
    multi = MultiAdapterModel(other_heads(tiny_distilbert())).load_adapter("peft", tmp_path)
    multi.set_adapter("peft")
    torch.testing.assert_close(multi(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_our_distilbert_classifier_loads_in_peft(ids, tmp_path):
    model = mark_only_lora_as_trainable(apply_lora_to_model(tiny_distilbert(), ["q_lin", "v_lin"], rank=4, alpha=8))
    randomize_lora_B(model)
    with torch.no_grad():
        model.pre_classifier.weight.normal_(std=0.2)
        model.classifier.weight.normal_(std=0.2)
    expected = model_output(model, ids)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(other_heads(tiny_distilbert()), tmp_path).eval()
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(peft.get_peft_model_state_dict(peft_model))
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)


def test_exclude_modules_follow_peft(ids, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                             exclude_modules=["model.layers.0.self_attn.q_proj"])
    peft_model = peft.get_peft_model(BUILDERS["llama"](), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    expected = model_output(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(BUILDERS["llama"](), tmp_path).eval()
    assert "model.layers.0.self_attn.q_proj" not in dict(lora_layers(ours))
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)


def test_peft_older_bin_adapter_loads(ids, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(BUILDERS["gpt2"](), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    expected = model_output(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path, safe_serialization=False)  # adapter_model.bin, as older PEFT wrote
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    torch.testing.assert_close(model_output(load_adapter(BUILDERS["gpt2"](), tmp_path).eval(), ids), expected,
                               rtol=0, atol=1e-5)


def test_peft_adapter_with_trained_biases_loads_here_and_not_per_row(ids, tmp_path):
    """PEFT with bias="all" on a classifier also writes the head's frozen original (`original_module`) and its
    trained copy (`modules_to_save`): the trained one is the head here, the frozen one is not loaded."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", bias="all")
    peft_model = peft.get_peft_model(BUILDERS["bert"](), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    expected = model_output(peft_model.eval(), ids)
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert any(".original_module." in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    ours = load_adapter(BUILDERS["bert"](), tmp_path).eval()
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)
    # one shared base cannot serve per-row biases: refused, not dropped
    from lora_linear import AdapterError
    from multi_lora import MultiAdapterModel
    with pytest.raises(AdapterError, match="bias"):
        MultiAdapterModel(BUILDERS["bert"]()).load_adapter("biased", tmp_path)


def test_the_label_count_comes_from_the_classifier_not_pre_classifier(tmp_path):
    # DistilBERT's pre_classifier.weight also ends in "classifier.weight"; in an older .bin it may come first
    model = mark_only_lora_as_trainable(apply_lora_to_model(tiny_distilbert(), ["q_lin"], rank=2))
    model.classifier = torch.nn.Linear(model.classifier.in_features, 3)
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file
    state = load_file(tmp_path / "adapter_model.safetensors")
    first = sorted(state, key=lambda k: "pre_classifier" not in k)  # pre_classifier's keys first
    torch.save({k: state[k] for k in first}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    from inference_example import num_labels_of
    assert num_labels_of(str(tmp_path)) == 3
