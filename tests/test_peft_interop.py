"""Adapters move both ways between this repo and Hugging Face PEFT (the real package)."""
import pytest
import torch
from conftest import BUILDERS, model_output, randomize_lora_B

from lora_linear import apply_lora_to_model, load_adapter, mark_only_lora_as_trainable, save_adapter

peft = pytest.importorskip("peft")

CASES = [("bert", ["query", "value"], "SEQ_CLS"), ("gpt2", ["c_attn"], "CAUSAL_LM"),
         ("llama", ["q_proj", "v_proj"], "CAUSAL_LM"), ("llama", "all", "CAUSAL_LM")]


@pytest.mark.parametrize("arch, targets, task", CASES)
def test_our_adapter_loads_in_peft_with_same_logits(arch, targets, task, ids, tmp_path):
    model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS[arch](), targets, rank=4, alpha=8))
    randomize_lora_B(model)
    if arch == "bert":
        torch.nn.init.normal_(model.classifier.weight)
    expected = model_output(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny", task_type=task)

    base = BUILDERS[arch](seed=0)
    if arch == "bert":
        torch.nn.init.zeros_(base.classifier.weight)  # PEFT must take the head from the adapter
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    loaded = peft.get_peft_model_state_dict(peft_model)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert set(saved) == set(loaded)  # nothing missing, nothing ignored
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch, targets, task", CASES)
def test_peft_adapter_loads_here_with_same_logits(arch, targets, task, ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets if targets != "all" else "all-linear",
                             task_type=task, fan_in_fan_out=arch == "gpt2")
    peft_model = peft.get_peft_model(BUILDERS[arch](), config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    peft_model.eval()
    expected = model_output(peft_model, ids)
    peft_model.save_pretrained(tmp_path)

    ours = load_adapter(BUILDERS[arch](), tmp_path).eval()
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)


def test_rslora_scaling_agrees_with_peft(ids, tmp_path):
    model = apply_lora_to_model(BUILDERS["llama"](), ["q_proj", "v_proj"], rank=16, alpha=8, scaling_mode="rslora")
    randomize_lora_B(model)
    expected = model_output(model, ids)
    save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path).eval()
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)
