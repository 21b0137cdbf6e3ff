"""Adapters move both ways between this repo and Hugging Face PEFT (the real package)."""
import pytest
import torch
from conftest import BUILDERS, model_output, randomize_lora_B, saved_peft_adapter

from lora_linear import (apply_lora_to_model, load_adapter, lora_layers, mark_only_lora_as_trainable, pattern_value,
                         save_adapter)

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


def test_per_layer_ranks_and_alphas_move_both_ways(ids, tmp_path):
    # ours -> PEFT: q_proj at r=4, v_proj at r=2 and alpha 6, layer 1's q_proj at r=8 (a per-layer budget)
    model = apply_lora_to_model(BUILDERS["llama"](), ["q_proj"], rank=4, alpha=8,
                                rank_pattern={"layers.1.self_attn.q_proj": 8})
    apply_lora_to_model(model, ["v_proj"], rank=2, alpha=6)
    randomize_lora_B(model)
    expected = model_output(model, ids)
    save_adapter(model, tmp_path / "ours")
    import json
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for name, layer in lora_layers(model):  # the defaults plus the patterns give every layer its own values
        assert pattern_value(config["rank_pattern"], name, config["r"]) == layer.lora.rank
        assert pattern_value(config["alpha_pattern"], name, config["lora_alpha"]) == layer.lora.alpha
    assert config["r"] == 2 and config["rank_pattern"]["model.layers.1.self_attn.q_proj"] == 8
    peft_model = peft.PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "ours").eval()
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(model_output(load_adapter(BUILDERS["llama"](), tmp_path / "ours"), ids), expected,
                               rtol=0, atol=1e-5)

    # PEFT -> ours: PEFT's own pattern keys are regular expressions matched at the end of the layer name
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                             rank_pattern={"v_proj": 2, r"layers\.0\.self_attn\.o_proj": 6},
                             alpha_pattern={"o_proj": 3})
    expected = model_output(saved_peft_adapter(BUILDERS["llama"](), config, tmp_path / "peft"), ids)
    ours = load_adapter(BUILDERS["llama"](), tmp_path / "peft")
    ranks = {name: layer.lora.rank for name, layer in lora_layers(ours)}
    assert ranks["model.layers.0.self_attn.o_proj"] == 6 and ranks["model.layers.1.self_attn.o_proj"] == 4
    assert ranks["model.layers.1.self_attn.v_proj"] == 2
    torch.testing.assert_close(model_output(ours, ids), expected, rtol=0, atol=1e-5)
    from multi_lora import MultiAdapterModel
    multi = MultiAdapterModel(BUILDERS["llama"]()).load_adapter("peft", tmp_path / "peft")
    with multi.rows(["peft", None, "peft"]):
        mixed = multi(input_ids=ids).logits
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-5)
