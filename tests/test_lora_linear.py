"""The LoRA library on tiny random BERT, GPT-2 (Conv1D) and Llama models."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from conftest import BUILDERS, model_output, randomize_lora_B, tiny_bert, tiny_gpt2, tiny_llama

from lora_linear import (AdapterError, _DropoutThenA, _keep_mask, _kept, LinearWithLoRA, LoRALayer, apply_lora_to_model, count_lora_parameters,
                         get_lora_state_dict, load_adapter, load_lora_state_dict, lora_disabled, lora_layers,
                         mark_only_lora_as_trainable, merge_and_unload, merge_lora_weights, save_adapter,
                         unmerge_lora_weights)

ARCHS = list(BUILDERS)


def lora_model(arch, targets=None, **kw):
    model = apply_lora_to_model(BUILDERS[arch](), targets, **kw)
    return mark_only_lora_as_trainable(model)


# --------------------------------------------------------------------------- the layer

def test_lora_layer_shapes_init_and_scaling():
    layer = LoRALayer(20, 30, rank=4, alpha=8)
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (30, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    assert layer.scaling == 2.0
    assert LoRALayer(20, 30, rank=4, alpha=8, scaling_mode="rslora").scaling == 4.0
    assert LoRALayer(20, 30, rank=4, alpha=8, scaling_mode="none").scaling == 1.0
    assert torch.count_nonzero(LoRALayer(20, 30, rank=4, init_B="kaiming").lora_B) > 0
    # Kaiming-uniform with a=sqrt(5) on (rank, in) bounds |A| by 1/sqrt(in), like nn.Linear
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(20) + 1e-6


def test_lora_layer_forward_is_scaled_BAx():
    layer = LoRALayer(6, 5, rank=2, alpha=6)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 6)
    expected = 3.0 * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": 0}, "alpha"),
    ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"init_B": "ones"}, "init_B"), ({"scaling_mode": "double"}, "scaling_mode"),
])
def test_bad_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALayer(8, 8, **kwargs)


def test_wrapping_freezes_base_and_shares_its_weight():
    base = nn.Linear(8, 4)
    wrapped = LinearWithLoRA(base, rank=2)
    assert wrapped.base_layer.weight is base.weight  # in place, no copy
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert wrapped.lora.lora_A.requires_grad and wrapped.lora.lora_B.requires_grad
    with pytest.raises(TypeError, match="Linear or transformers Conv1D"):
        LinearWithLoRA(nn.Conv2d(3, 3, 3))


def test_conv1d_wrapper_matches_equivalent_linear():
    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(nf=6, nx=5)  # weight (in=5, out=6)
    nn.init.normal_(conv.weight)
    linear = nn.Linear(5, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = LinearWithLoRA(conv, rank=3), LinearWithLoRA(linear, rank=3)
    b.lora.load_state_dict(a.lora.state_dict())
    nn.init.normal_(a.lora.lora_B)
    b.lora.lora_B.data.copy_(a.lora.lora_B)
    assert a.lora.lora_A.shape == (3, 5) and a.lora.lora_B.shape == (6, 3)
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(a(x), b(x))


def test_dropout_acts_only_in_training_mode():
    layer = LinearWithLoRA(nn.Linear(64, 64), rank=4, dropout=0.5)
    nn.init.normal_(layer.lora.lora_B)
    x = torch.randn(8, 64)
    layer.eval()  # no dropout: exactly W0 x + s B A x
    lora = layer.lora
    torch.testing.assert_close(layer(x), layer.base_layer(x) + lora.scaling * x @ lora.lora_A.T @ lora.lora_B.T)
    torch.manual_seed(0)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    # the frozen path is never dropped: with B = 0 training and eval agree
    zero = LinearWithLoRA(nn.Linear(64, 64), rank=4, dropout=0.5).train()
    torch.testing.assert_close(zero(x), zero.base_layer(x))


def test_dropout_path_gradients_match_autograd_through_the_same_mask():
    """The lean dropout (x and a one-byte mask kept for backward) computes what autograd would."""
    x = torch.randn(3, 5, 16, dtype=torch.double, requires_grad=True)
    A = torch.randn(4, 16, dtype=torch.double, requires_grad=True)
    layer_path = lambda x, A: (torch.manual_seed(0), _DropoutThenA.apply(x, A, 0.3))[1]  # the same mask each call
    assert torch.autograd.gradcheck(layer_path, (x, A))
    torch.manual_seed(0)
    keep, scale = _keep_mask(x.shape, 0.3, x.device)  # the mask it draws
    assert abs(scale - 1 / 0.7) < 1 / 0.7 * 2 ** -15  # p = 0.3 to within 2^-16
    reference = nn.functional.linear(x * keep * scale, A)
    torch.testing.assert_close(layer_path(x, A), reference)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_dropout_path_under_bf16_autocast_matches_autograd(x_dtype):
    x = torch.randn(4, 7, 32).to(x_dtype).requires_grad_()
    A = torch.randn(8, 32, requires_grad=True)  # LoRA weights stay fp32 on a bf16 base
    with torch.autocast("cpu", torch.bfloat16):
        torch.manual_seed(1)
        out = _DropoutThenA.apply(x, A, 0.2)
        torch.manual_seed(1)
        reference = nn.functional.linear(_kept(x, *_keep_mask(x.shape, 0.2, x.device)), A)
    grad = torch.randn_like(out)
    for mine, theirs in zip(torch.autograd.grad(out, (x, A), grad), torch.autograd.grad(reference, (x, A), grad)):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_the_dropout_mask_keeps_each_input_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    shape = torch.Size([3, 1001, 333])  # a count that is not a multiple of 4: part of the last 64-bit draw is unused
    keep, scale = _keep_mask(shape, p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == shape
    kept = 1 / scale  # P(kept) of the p it resolved, within 2^-16 of 1 - p
    assert abs(kept - (1 - p)) <= 2 ** -17
    n = shape.numel()
    assert abs(keep.float().mean().item() - kept) < 5 * (kept * (1 - kept) / n) ** 0.5  # five binomial sigmas
    # neighbours (quarters of one 64-bit draw) are independent: P(both kept) = P(kept)^2
    pairs, both = keep.flatten()[:n - 1].view(-1, 2), kept ** 2
    assert abs((pairs[:, 0] & pairs[:, 1]).float().mean().item() - both) < 5 * (both * (1 - both) / len(pairs)) ** 0.5
    assert _keep_mask(shape, 0.0, torch.device("cpu"))[0].all()
    # p near 1 keeps one value in 2^16 (no integer wrap-around that would keep all)
    assert keep.numel() * 2 ** -16 / 4 < _keep_mask(shape, 1 - 1e-12, torch.device("cpu"))[0].sum() < n * 2 ** -15
    assert not torch.equal(keep, _keep_mask(shape, p, torch.device("cpu"))[0])  # a new mask each call


def test_dropout_keeps_only_its_input_and_a_byte_mask_for_backward():
    """A training LoRA layer with dropout keeps x (which the base layer's neighbours share) and a bool mask,
    not a dropped copy of x plus a float mask: a quarter of a causal LM's activation memory."""
    layer = LinearWithLoRA(nn.Linear(256, 256), rank=8, dropout=0.1).train()
    mark_only_lora_as_trainable(layer)
    x = torch.randn(64, 256, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    x_bytes = x.numel() * x.element_size()
    assert sum(kept.values()) <= x_bytes + x.numel() + 64 * 8 * 4  # x, the mask, A x (rank 8)


# --------------------------------------------------------------------------- model surgery

@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_lora_model_equals_base(arch, ids):
    reference = model_output(BUILDERS[arch](), ids)
    model = lora_model(arch)
    # defaults: query+value / q_proj+v_proj in each of two layers; GPT-2 fuses q, k, v into one c_attn
    assert len(lora_layers(model)) == (2 if arch == "gpt2" else 4)
    torch.testing.assert_close(model_output(model, ids), reference, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_lora_and_head_get_gradients_and_change(arch, ids):
    model = lora_model(arch).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {"classifier.weight", "classifier.bias"} if arch == "bert" else set()
    assert trainable == {n for n in before if ".lora.lora_" in n} | head
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(input_ids=ids, labels=torch.tensor([0, 1, 1]) if arch == "bert" else ids)
        out.loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_target_matching_is_exact_name_or_suffix_never_substring():
    model = tiny_bert()
    apply_lora_to_model(model, ["dense"])
    names = [n for n, _ in lora_layers(model)]
    # 'dense' is the leaf of attention.output.dense, intermediate.dense, output.dense and pooler.dense
    assert len(names) == 2 * 3 + 1 and all(n.endswith(".dense") for n in names)
    model = tiny_bert()
    apply_lora_to_model(model, ["attention.self.query"])
    assert [n for n, _ in lora_layers(model)] == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    with pytest.raises(ValueError, match="matches no layer"):
        apply_lora_to_model(tiny_bert(), ["quer"])  # a substring is not a match


def test_unknown_target_lists_existing_layer_names():
    with pytest.raises(ValueError) as err:
        apply_lora_to_model(tiny_gpt2(), ["qkv"])
    message = str(err.value)  # both the generic roles and this model's own layer names
    assert "'qkv'" in message and "c_attn" in message and "c_fc" in message and "q_proj, k_proj, v_proj, o_proj" in message
    with pytest.raises(ValueError, match="Linear/Conv1D"):
        apply_lora_to_model(tiny_bert(), ["attention"])  # matches a block, not a projection


def test_all_wraps_every_linear_except_the_head():
    bert = apply_lora_to_model(tiny_bert(), "all")
    assert not isinstance(bert.classifier, LinearWithLoRA)
    assert len(lora_layers(bert)) == 2 * 6 + 1  # q, k, v, attn-out, intermediate, output per layer + pooler
    gpt2 = apply_lora_to_model(tiny_gpt2(), "all")
    assert not isinstance(gpt2.lm_head, LinearWithLoRA) and len(lora_layers(gpt2)) == 2 * 4
    llama = apply_lora_to_model(tiny_llama(), "all")
    assert not isinstance(llama.lm_head, LinearWithLoRA) and len(lora_layers(llama)) == 2 * 7


def test_applying_twice_does_not_double_wrap(ids):
    model = lora_model("bert")
    randomize_lora_B(model)
    out = model_output(model, ids)
    apply_lora_to_model(model, ["query", "value"])
    apply_lora_to_model(model, "all")
    assert not any(isinstance(m.base_layer, LinearWithLoRA) for _, m in lora_layers(model))
    assert len(lora_layers(model)) == 13
    torch.testing.assert_close(model_output(model, ids), out)  # new layers start at B = 0


def closed_form(model, rank):
    """r * (in + out) for every wrapped layer, from the base weights alone."""
    total = 0
    for _, layer in lora_layers(model):
        shape = layer.base_layer.weight.shape
        total += rank * (shape[0] + shape[1])
    return total


@pytest.mark.parametrize("arch, targets", [("bert", None), ("bert", ["query", "key", "value"]),
                                           ("bert", "all"), ("gpt2", None), ("gpt2", "all"),
                                           ("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                           ("llama", "all")])
def test_parameter_counts_match_closed_form(arch, targets):
    base_total = sum(p.numel() for p in BUILDERS[arch]().parameters())
    model = lora_model(arch, targets, rank=4)
    counts = count_lora_parameters(model)
    head = sum(p.numel() for p in model.classifier.parameters()) if arch == "bert" else 0
    assert counts["lora"] == closed_form(model, 4)
    assert counts["trainable"] == counts["lora"] + head
    assert counts["total"] == base_total + counts["lora"]
    assert counts["frozen"] == base_total - head
    assert counts["percentage"] == pytest.approx(100 * counts["trainable"] / counts["total"])


def test_closed_form_for_bert_base_and_gpt2_small():
    """The numbers the README quotes, on the real architectures (built on the meta device: no memory)."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        bert = BertForSequenceClassification(BertConfig(num_labels=2))  # bert-base-uncased dimensions
        gpt2 = GPT2LMHeadModel(GPT2Config())  # GPT-2 small
    apply_lora_to_model(bert, ["query", "value"], rank=8)
    mark_only_lora_as_trainable(bert)
    counts = count_lora_parameters(bert)
    assert counts["lora"] == 294_912 and counts["trainable"] == 294_912 + 1_538
    assert counts["total"] == 109_483_778 + 294_912
    assert counts["frozen"] == 109_483_778 - 1_538 == 109_482_240  # everything but LoRA and the new head
    apply_lora_to_model(gpt2, ["c_attn"], rank=8)
    mark_only_lora_as_trainable(gpt2)
    assert count_lora_parameters(gpt2)["lora"] == count_lora_parameters(gpt2)["trainable"] == 294_912


# --------------------------------------------------------------------------- merge

@pytest.mark.parametrize("arch", ARCHS)
def test_merge_equals_unmerged_and_unmerge_restores(arch, ids):
    model = lora_model(arch, "all")
    randomize_lora_B(model)
    base_weights = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model)}
    unmerged = model_output(model, ids)
    assert not torch.allclose(unmerged, model_output(BUILDERS[arch](), ids), atol=1e-3)
    merge_lora_weights(model)
    torch.testing.assert_close(model_output(model, ids), unmerged, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        merge_lora_weights(model)  # a second merge is a no-op
    torch.testing.assert_close(model_output(model, ids), unmerged, rtol=0, atol=1e-5)
    unmerge_lora_weights(model)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, base_weights[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model_output(model, ids), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_and_unload_gives_a_plain_model(arch, ids, tmp_path):
    model = lora_model(arch)
    randomize_lora_B(model)
    expected = model_output(model, ids)
    plain = merge_and_unload(model)
    assert not lora_layers(plain) and not hasattr(plain, "lora_config")
    torch.testing.assert_close(model_output(plain, ids), expected, rtol=0, atol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = type(plain).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded, ids), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- state and files

@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_reproduces_outputs(arch, ids, tmp_path):
    model = lora_model(arch)
    randomize_lora_B(model)
    if arch == "bert":
        nn.init.normal_(model.classifier.weight)  # a trained head must travel with the adapter
    expected = model_output(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["base_model_name_or_path"] == "tiny"
    assert config["task_type"] == ("SEQ_CLS" if arch == "bert" else "CAUSAL_LM")
    assert config["fan_in_fan_out"] == (arch == "gpt2")
    fresh = load_adapter(BUILDERS[arch](), tmp_path)  # bare base: LoRA is applied from the config
    torch.testing.assert_close(model_output(fresh, ids), expected, rtol=0, atol=1e-6)


def test_adapter_uses_peft_key_names_and_orientation(tmp_path):
    from safetensors.torch import load_file
    save_adapter(lora_model("gpt2"), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    a = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (8, 32) and b.shape == (3 * 32, 8)  # (r, in) and (out, r), also for Conv1D
    save_adapter(lora_model("bert"), tmp_path / "bert")
    tensors = load_file(tmp_path / "bert" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)


def test_strict_state_dict_load_names_the_problem():
    model = lora_model("bert")
    state = get_lora_state_dict(model)
    missing = dict(state)
    key = next(k for k in missing if k.endswith("lora_A"))
    del missing[key]
    with pytest.raises(AdapterError, match="missing keys.*" + key.replace(".", r"\.")):
        load_lora_state_dict(model, missing)
    with pytest.raises(AdapterError, match="unexpected keys.*extra.lora_A"):
        load_lora_state_dict(model, {**state, "extra.lora_A": torch.zeros(1)})
    with pytest.raises(AdapterError, match="shape mismatch"):
        load_lora_state_dict(model, {**state, key: torch.zeros(3, 3)})


def test_adapter_for_a_different_base_is_refused(tmp_path):
    save_adapter(lora_model("bert", rank=4), tmp_path)
    from transformers import BertConfig, BertForSequenceClassification
    wider = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    with pytest.raises(AdapterError, match="shape mismatch"):
        load_adapter(wider, tmp_path)


def test_corrupt_truncated_and_foreign_adapters_are_refused(tmp_path):
    save_adapter(lora_model("bert"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(tiny_bert(), tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load_adapter(tiny_bert(), tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20}))
    with pytest.raises(AdapterError, match="not a LoRA config"):
        load_adapter(tiny_bert(), tmp_path)
    config.write_text("{ not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tiny_bert(), tmp_path)
    os.remove(config)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(tiny_bert(), tmp_path)


def test_pickled_adapter_is_never_loaded(tmp_path):
    save_adapter(lora_model("bert"), tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle data that must not be opened")
    with pytest.raises(AdapterError, match="never unpickled"):
        load_adapter(tiny_bert(), tmp_path)


def test_scaling_off_survives_save_and_load(ids, tmp_path):
    model = apply_lora_to_model(tiny_llama(), rank=4, alpha=16, scaling_mode="none")
    randomize_lora_B(model)
    expected = model_output(model, ids)
    save_adapter(model, tmp_path)
    torch.testing.assert_close(model_output(load_adapter(tiny_llama(), tmp_path), ids), expected, rtol=0, atol=1e-6)


def test_merging_on_a_bf16_base_rounds_once(ids):
    """W0 + s B A is added in fp32 and rounded to bf16 once: the merged weight is the nearest bf16 to the sum."""
    model = apply_lora_to_model(tiny_llama().to(torch.bfloat16), ["q_proj", "v_proj"])
    randomize_lora_B(model)
    layers = lora_layers(model)
    exact = {n: m.base_layer.weight.float() + m.lora.delta_weight().detach() for n, m in layers}
    merge_lora_weights(model)
    for name, layer in layers:
        assert torch.equal(layer.base_layer.weight, exact[name].to(torch.bfloat16))


def test_applying_other_slices_of_a_wrapped_fused_layer_is_refused():
    model = apply_lora_to_model(tiny_gpt2(), ["q_proj"])
    with pytest.raises(ValueError, match="already adapted on other slices"):
        apply_lora_to_model(model, ["v_proj"])  # would otherwise leave the v third silently unadapted
    apply_lora_to_model(model, ["q_proj"])  # the same request again is fine


def test_loading_into_a_model_wrapped_with_another_scaling_is_refused(ids, tmp_path):
    model = apply_lora_to_model(tiny_llama(), ["q_proj", "v_proj"], rank=4, alpha=32)
    randomize_lora_B(model)
    save_adapter(model, tmp_path)
    for kwargs in ({"alpha": 8}, {"alpha": 32, "scaling_mode": "rslora"}):
        other = apply_lora_to_model(tiny_llama(), ["q_proj", "v_proj"], rank=4, **kwargs)
        with pytest.raises(AdapterError, match="scales"):
            load_adapter(other, str(tmp_path))
    same = apply_lora_to_model(tiny_llama(), ["q_proj", "v_proj"], rank=4, alpha=32)
    torch.testing.assert_close(model_output(load_adapter(same, str(tmp_path)), ids), model_output(model, ids))


def test_layers_of_mixed_scaling_modes_save_and_load_exactly(ids, tmp_path):
    model = apply_lora_to_model(tiny_llama(), ["q_proj"], rank=4, alpha=8, scaling_mode="rslora")
    apply_lora_to_model(model, ["v_proj"], rank=4, alpha=8)  # standard: PEFT's config can say only one of them
    randomize_lora_B(model)
    save_adapter(model, tmp_path)
    torch.testing.assert_close(model_output(load_adapter(tiny_llama(), str(tmp_path)), ids), model_output(model, ids))


def test_half_precision_base_keeps_fp32_lora(ids):
    model = apply_lora_to_model(tiny_llama().to(torch.bfloat16))
    layer = lora_layers(model)[0][1]
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora.lora_A.dtype == torch.float32
    assert model_output(model, ids).dtype == torch.bfloat16


def test_lora_disabled_runs_the_base_alone(ids):
    reference = model_output(tiny_bert(), ids)
    model = lora_model("bert")
    randomize_lora_B(model)
    adapted = model_output(model, ids)
    with lora_disabled(model):
        torch.testing.assert_close(model_output(model, ids), reference, rtol=0, atol=0)
    torch.testing.assert_close(model_output(model, ids), adapted)
    merge_lora_weights(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lora_disabled(model):
            pass


def test_vision_transformer_default_targets():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = vit(pixel_values=pixels).logits
    mark_only_lora_as_trainable(apply_lora_to_model(vit))
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(vit)}) == ["q_proj", "v_proj"]
    assert count_lora_parameters(vit)["lora"] == 2 * 2 * 8 * (32 + 32)
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values=pixels).logits, reference, rtol=0, atol=0)
