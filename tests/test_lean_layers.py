"""lean_layers: the same forward and gradients as transformers' RMSNorm and SwiGLU, with less kept for backward."""
import pytest
import torch

import lean_layers
from conftest import BUILDERS, VOCAB, randomize_lora_B
from lean_layers import use_lean_layers
from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable


def tiny_causal_lm(arch, seed=0):
    """A tiny random Llama, Mistral or Qwen2, its norm weights random too (a fresh model's are all 1)."""
    import transformers
    if arch == "llama":
        model = BUILDERS["llama"](seed)
    else:
        config_class, model_class = {"mistral": ("MistralConfig", "MistralForCausalLM"),
                                     "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
        torch.manual_seed(seed)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5, generator=generator)
    return model.train()


def lora_model(arch, dtype, norm_dtype=None):
    """LoRA (no dropout) on a tiny model, frozen weights in `dtype` and LoRA in fp32, as training stores them;
    norm_dtype: the norms' weights in another dtype (fp32 on a bf16 base: the norm's output is then fp32)."""
    model = mark_only_lora_as_trainable(apply_lora_to_model(tiny_causal_lm(arch), None, rank=4, dropout=0.0))
    randomize_lora_B(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            param.data = param.data.to(norm_dtype if norm_dtype and "norm" in name else dtype)
    return model


def loss_and_grads(model, ids, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_lean_matches(model, dtype, ids=None):
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    logits, grads = loss_and_grads(model, ids, dtype)
    assert use_lean_layers(model) == 2 * 2 + 1 + 2  # two norms a layer, the final norm, one MLP a layer
    lean_logits, lean_grads = loss_and_grads(model, ids, dtype)
    assert torch.equal(lean_logits, logits)  # the forward computes the same ops in the same order
    assert lean_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():  # gradients reach LoRA through every norm and MLP of the model
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_logits_and_gradients_as_transformers_layers(arch, dtype):
    assert_lean_matches(lora_model(arch, dtype), dtype)


def test_an_fp32_norm_weight_on_a_bf16_base_gives_the_same_gradients():
    assert_lean_matches(lora_model("llama", torch.bfloat16, norm_dtype=torch.float32), torch.bfloat16)


def test_under_gradient_checkpointing_the_same_gradients():
    model = lora_model("llama", torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_lean_matches(model, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trained_norm_gets_the_same_weight_gradient(dtype):
    model = tiny_causal_lm("llama").to(dtype)  # nothing frozen, as in full fine-tuning
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    _, grads = loss_and_grads(model, ids, dtype)
    use_lean_layers(model)
    _, lean_grads = loss_and_grads(model, ids, dtype)
    for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight", "model.layers.1.mlp.up_proj.weight"):
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(lean_grads[name], grads[name], rtol=1e-5, atol=1e-7)


def saved_bytes(model, ids):
    """Bytes autograd keeps for backward in one forward, each storage counted once, weights not counted."""
    weights = {p.data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in weights:
            kept[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids)
    return sum(kept.values())


def test_each_layer_keeps_less_for_backward():
    model, ids = lora_model("llama", torch.bfloat16), torch.randint(1, VOCAB, (2, 16))
    before = saved_bytes(model, ids)
    use_lean_layers(model)
    after = saved_bytes(model, ids)
    tokens, config = ids.numel(), model.config
    # per layer and token: each norm keeps its bf16 input, not an fp32 copy (2 bytes a feature less), and the
    # MLP no longer keeps silu(gate) (2 bytes a hidden unit); the final norm's input is saved in either case
    saved_by_lean = tokens * config.num_hidden_layers * (2 * 2 * config.hidden_size + 2 * config.intermediate_size)
    assert before - after >= saved_by_lean


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_other_architectures_are_left_as_they_are(arch):
    model = BUILDERS[arch]()
    assert use_lean_layers(model) == 0
    assert all("forward" not in vars(module) for module in model.modules())


def test_training_a_llama_style_causal_lm_uses_them(tiny_assets, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    import train_lora_basic
    from config import build_arg_parser, load_config
    from conftest import write_tiny_tokenizer
    folder = str(tmp_path / "llama")
    vocab = write_tiny_tokenizer(folder)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=3, eos_token_id=3, pad_token_id=0)).save_pretrained(folder)
    config = load_config(build_arg_parser("").parse_args([
        "--model", folder, "--task", "causal_lm", "--train_file", tiny_assets["train_txt"], "--validation_file",
        tiny_assets["validation_txt"], "--max_length", "32", "--device", "cpu", "--precision", "fp32",
        "--output_dir", str(tmp_path / "out")]))
    run = train_lora_basic.build_run(config, torch.device("cpu"), saves=False)
    replaced = {name: vars(module)["forward"].__func__ for name, module in run.model.named_modules()
                if "forward" in vars(module)}
    assert len(replaced) == 2 * 2 + 1 + 2
    assert replaced["model.norm"] is lean_layers._rms_norm_forward
    assert replaced["model.layers.1.mlp"] is lean_layers._swiglu_forward


def long_causal_lm(arch, seed=0, heads=4, **gpt2_options):
    """A tiny random Llama (grouped-query: 2 key/value heads for `heads` query heads) or GPT-2 that takes 600 positions;
    GPT-2 without dropout unless gpt2_options say otherwise."""
    import transformers
    torch.manual_seed(seed)
    if arch == "gpt2":
        options = {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0, **gpt2_options}
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=600, **options)).train()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        num_key_value_heads=2, max_position_embeddings=600)).train()


def attention_calls(model, ids, attention_mask=None, monkeypatch=None):
    """Logits, the input embeddings' gradient, and the query lengths scaled_dot_product_attention was called with."""
    lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return sdpa(query, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)
    embeddings.grad = None
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    logits.pow(2).mean().backward()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
    return logits.detach(), embeddings.grad.clone(), lengths


@pytest.mark.parametrize("arch", ["llama", "llama, 4 query heads a key/value head", "gpt2", "gpt2 scaled by layer"])
@pytest.mark.parametrize("length", [384, 401, 512])
def test_attention_in_halves_gives_sdpa_values_with_fewer_scores(arch, length, monkeypatch):
    # GPT-2's scale_attn_by_inverse_layer_idx: another scale per layer, which the halves must pass on
    model = long_causal_lm("gpt2", scale_attn_by_inverse_layer_idx=True) if "scaled" in arch \
        else long_causal_lm("llama", heads=8) if "4 query heads" in arch else long_causal_lm(arch)
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))
    logits, grad, lengths = attention_calls(model, ids, monkeypatch=monkeypatch)
    assert lengths == [length] * 2  # transformers' sdpa: one call a layer
    use_lean_layers(model)
    assert model.config._attn_implementation == lean_layers.HALVED_ATTENTION
    halved_logits, halved_grad, halved_lengths = attention_calls(model, ids, monkeypatch=monkeypatch)
    # two halves of the queries a layer; with 4 query heads a key/value head, 4 x 192 and more queries: stacked
    stacked = 4 if "4 query heads" in arch else 1
    assert halved_lengths == [stacked * (length // 2), stacked * (length - length // 2)] * 2
    torch.testing.assert_close(halved_logits, logits, rtol=1e-5, atol=1e-5)  # the same math, rounded apart
    torch.testing.assert_close(halved_grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("length, padded", [(383, False), (600, False), (512, True)])
def test_attention_in_halves_leaves_other_cases_to_sdpa(length, padded, monkeypatch):
    """Shorter or longer than one key block of the CPU kernel, or padded (a mask): sdpa's own call."""
    model = long_causal_lm("llama")
    ids = torch.randint(1, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, -7:] = 0
    logits, grad, _ = attention_calls(model, ids, mask, monkeypatch)
    use_lean_layers(model)
    halved_logits, halved_grad, lengths = attention_calls(model, ids, mask, monkeypatch)
    assert lengths == [length] * 2
    assert torch.equal(halved_logits, logits)
    torch.testing.assert_close(halved_grad, grad, rtol=1e-6, atol=1e-9)  # summed into the embeddings by threads


def test_attention_dropout_keeps_sdpa(monkeypatch):
    model = long_causal_lm("gpt2", attn_pdrop=0.1)  # in training mode: sdpa's own dropout
    use_lean_layers(model)
    _, _, lengths = attention_calls(model, torch.randint(1, VOCAB, (2, 512)), monkeypatch=monkeypatch)
    assert lengths == [512] * 2


@pytest.mark.parametrize("case", ["not causal", "fewer queries than keys (a cache)"])
def test_attention_in_halves_leaves_these_calls_to_sdpa(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    model = long_causal_lm("llama")
    module = model.model.layers[0].self_attn
    generator = torch.Generator().manual_seed(0)
    queries = 400 if "cache" in case else 512
    query = torch.randn(2, 4, queries, 8, generator=generator)
    key, value = torch.randn(2, 2, 512, 8, generator=generator), torch.randn(2, 2, 512, 8, generator=generator)
    options = {"is_causal": False} if case == "not causal" else {}
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.3, **options)
    got, _ = lean_layers.causal_attention_in_halves(module, query, key, value, None, scaling=0.3, **options)
    assert torch.equal(got, expected)


def test_an_encoder_keeps_its_attention():
    model = BUILDERS["bert"]()
    before = model.config._attn_implementation
    use_lean_layers(model)
    assert model.config._attn_implementation == before
