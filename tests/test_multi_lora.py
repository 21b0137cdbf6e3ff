"""Several adapters on one base model: swap, base only, and per-row adapters in one batch."""
import pytest
import torch
from conftest import BUILDERS, model_output, randomize_lora_B, saved_peft_adapter

from lora_linear import apply_lora_to_model, load_adapter, mark_only_lora_as_trainable, merge_lora_weights, save_adapter
from multi_lora import MultiAdapterModel


def make_adapters(arch, tmp_path, specs):
    """Save one adapter per (name, targets, rank) spec, each with its own random B (and head)."""
    dirs = {}
    for seed, (name, targets, rank) in enumerate(specs, start=1):
        model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS[arch](), targets, rank=rank, alpha=2 * rank))
        randomize_lora_B(model, seed=seed)
        if arch == "bert":
            torch.nn.init.normal_(model.classifier.weight, generator=torch.Generator().manual_seed(seed))
        save_adapter(model, tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def single(arch, adapter_dir, ids):
    return model_output(load_adapter(BUILDERS[arch](), adapter_dir).eval(), ids)


SPECS = {"bert": [("a", ["query", "value"], 4), ("b", "all", 8), ("c", ["query"], 2)],
         "gpt2": [("a", ["c_attn"], 4), ("b", "all", 8), ("c", ["c_proj"], 2)],
         "llama": [("a", ["q_proj", "v_proj"], 4), ("b", "all", 8), ("c", ["o_proj"], 2)]}


@pytest.mark.parametrize("arch", list(SPECS))
def test_swap_base_only_and_mixed_batch_match_single_adapters(arch, ids, tmp_path):
    dirs = make_adapters(arch, tmp_path, SPECS[arch])
    multi = MultiAdapterModel(BUILDERS[arch]())
    for name, folder in dirs.items():
        multi.load_adapter(name, folder)
    expected = {name: single(arch, folder, ids) for name, folder in dirs.items()}
    expected[None] = model_output(BUILDERS[arch](), ids)
    for name in ["b", "a", None, "c"]:  # hot swap in any order
        multi.set_adapter(name)
        torch.testing.assert_close(multi(input_ids=ids).logits, expected[name], rtol=0, atol=1e-5)
    choice = ["c", None, "a"]  # one forward pass, a different adapter per row
    with multi.rows(choice):
        mixed = multi(input_ids=ids).logits
    for row, name in enumerate(choice):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=0, atol=1e-5)


def test_mixed_batch_generation_equals_each_row_alone(ids, tmp_path):
    dirs = make_adapters("gpt2", tmp_path, SPECS["gpt2"])
    multi = MultiAdapterModel(BUILDERS["gpt2"]())
    for name, folder in dirs.items():
        multi.load_adapter(name, folder)
    choice = ["b", "a", None]
    with multi.rows(choice):
        mixed = multi.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, name in enumerate(choice):
        model = load_adapter(BUILDERS["gpt2"](), dirs[name]) if name else BUILDERS["gpt2"]()
        alone = model.eval().generate(input_ids=ids[row:row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(mixed[row], alone[0])


def test_delete_unknown_names_and_merged_weights_are_refused(ids, tmp_path):
    dirs = make_adapters("bert", tmp_path, SPECS["bert"])
    multi = MultiAdapterModel(BUILDERS["bert"]())
    multi.load_adapter("a", dirs["a"]).load_adapter("b", dirs["b"])
    with pytest.raises(ValueError, match="already loaded"):
        multi.load_adapter("a", dirs["c"])
    with pytest.raises(KeyError, match="no adapter named 'zzz'; loaded: a, b"):
        multi.set_adapter("zzz")
    with pytest.raises(KeyError, match="no adapter named"):
        with multi.rows(["a", "zzz", None]):
            pass
    multi.delete_adapter("a")
    assert multi.adapters == ["b"]
    multi.set_adapter("b")
    torch.testing.assert_close(multi(input_ids=ids).logits, single("bert", dirs["b"], ids), rtol=0, atol=1e-5)
    merged = load_adapter(BUILDERS["bert"](), dirs["a"])
    merge_lora_weights(merged)
    with pytest.raises(RuntimeError, match="merged"):
        MultiAdapterModel(merged)


def test_adapter_for_another_base_is_refused(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    dirs = make_adapters("bert", tmp_path, SPECS["bert"][:1])
    wide = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64))
    with pytest.raises(ValueError, match="does not fit this base model"):
        MultiAdapterModel(wide).load_adapter("a", dirs["a"])


def test_ten_adapters_cost_the_base_plus_ten_small_adapters(tmp_path):
    dirs = make_adapters("llama", tmp_path, [(f"t{i}", ["q_proj", "v_proj"], 4) for i in range(10)])
    base = BUILDERS["llama"]()
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    multi = MultiAdapterModel(base)
    for name, folder in dirs.items():
        multi.load_adapter(name, folder)
    total = sum(t.numel() * t.element_size() for t in list(multi.model.parameters()) + list(multi.model.buffers()))
    per_adapter = 2 * 2 * 4 * (32 + 32) * 4  # layers x (q, v) x r x (in + out) x fp32 bytes
    assert total - base_bytes <= 11 * per_adapter + 1024  # ten adapters plus the zero slot, never ten models


def test_peft_saved_adapter_loads_by_name(ids, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    expected = model_output(saved_peft_adapter(BUILDERS["llama"](), config, tmp_path / "from_peft"), ids)
    ours = make_adapters("llama", tmp_path, SPECS["llama"][:1])
    multi = MultiAdapterModel(BUILDERS["llama"]()).load_adapter("ours", ours["a"]).load_adapter("peft", tmp_path / "from_peft")
    with multi.rows(["peft", "ours", "peft"]):
        mixed = multi(input_ids=ids).logits
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], single("llama", ours["a"], ids)[1], rtol=0, atol=1e-5)


def test_mixed_batch_on_a_bf16_base_matches_single_adapters_on_it(ids, tmp_path):
    dirs = make_adapters("bert", tmp_path, SPECS["bert"])  # fp32 adapters and heads
    multi = MultiAdapterModel(BUILDERS["bert"]().to(torch.bfloat16))
    for name, folder in dirs.items():
        multi.load_adapter(name, folder)
    choice = ["b", None, "a"]
    with multi.rows(choice):
        mixed = multi(input_ids=ids).logits
    for row, name in enumerate(choice):
        alone = BUILDERS["bert"]().to(torch.bfloat16)
        alone = load_adapter(alone, dirs[name]) if name else alone
        torch.testing.assert_close(mixed[row].float(), model_output(alone.eval(), ids)[row].float(), rtol=0, atol=2e-2)
