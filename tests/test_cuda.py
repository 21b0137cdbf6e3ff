"""The CUDA paths: fp16 with a GradScaler, bf16, a half-precision base, CUDA memory, merge and mixed batches on
the GPU. Skipped on machines without CUDA (CI has none); run them on a GPU with `python -m pytest tests/test_cuda.py`."""
import json

import pytest
import torch
from conftest import BUILDERS, model_output, randomize_lora_B

import train_lora_basic
from lora_linear import (apply_lora_to_model, load_adapter, mark_only_lora_as_trainable, merge_lora_weights,
                         save_adapter, unmerge_lora_weights)
from test_training import bert_args, gpt2_args, metrics_of
from precision import pick_device, resolve_precision
from report import peak_memory_mb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def on_cuda(args):
    return [a if a != "cpu" else "cuda" for a in args]  # the helpers pass --device cpu


def test_auto_precision_is_bf16_where_supported_else_fp16():
    assert pick_device("auto").type == "cuda"
    assert resolve_precision("auto", CUDA) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_classification_trains_on_cuda_in_each_precision(tiny_assets, tmp_path, precision):
    out = tmp_path / precision
    assert train_lora_basic.main(on_cuda(bert_args(tiny_assets, out, "--precision", precision))) == 0
    metrics = metrics_of(out)
    assert metrics["precision"] == precision and metrics["device"].startswith("cuda")
    epochs = metrics["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] and metrics["best"]["value"] > 0.6
    assert metrics["peak_memory_mb"] > 0
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(out / "adapter_model.safetensors").values())


@pytest.mark.slow
def test_fp16_gradscaler_state_survives_a_resume(tiny_assets, tmp_path):
    out = tmp_path / "run"

    def stop_at_step_5(state):
        if state["step"] == 5:
            train_lora_basic.request_stop()
    args = on_cuda(bert_args(tiny_assets, out, "--precision", "fp16"))
    assert train_lora_basic.main(args, callbacks=[stop_at_step_5]) == 130
    saved = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert saved["scaler"] and saved["scaler"]["scale"] > 0
    assert train_lora_basic.main(args + ["--resume"]) == 0
    assert metrics_of(out)["epochs"][-1]["step"] == 36


@pytest.mark.slow
def test_half_precision_base_on_cuda_keeps_fp32_lora_and_head(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert train_lora_basic.main(on_cuda(bert_args(tiny_assets, out, "--epochs", "1", "--precision", "bf16",
                                                   "--base_dtype", "bf16"))) == 0
    assert "torch.bfloat16" in (out / "model_comparison.txt").read_text()
    from safetensors.torch import load_file
    saved = load_file(out / "adapter_model.safetensors")
    assert any("classifier" in k for k in saved) and all(t.dtype == torch.float32 for t in saved.values())


@pytest.mark.slow
def test_causal_lm_trains_on_cuda_with_bf16(tiny_assets, tmp_path):
    out = tmp_path / "lm"
    assert train_lora_basic.main(on_cuda(gpt2_args(tiny_assets, out, "--precision", "bf16"))) == 0
    epochs = metrics_of(out)["epochs"]
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]


def test_peak_memory_is_cuda_max_allocated():
    torch.cuda.reset_peak_memory_stats()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=CUDA)
    del block
    assert 64 <= peak_memory_mb(CUDA) < 64 + 512


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_merge_unmerge_and_adapter_round_trip_on_cuda(arch, ids, tmp_path):
    model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS[arch](), "all", rank=4, alpha=8))
    randomize_lora_B(model)
    model = model.to(CUDA)
    ids = ids.to(CUDA)
    unmerged = model_output(model, ids)
    merge_lora_weights(model)
    torch.testing.assert_close(model_output(model, ids), unmerged, rtol=0, atol=1e-4)
    unmerge_lora_weights(model)
    torch.testing.assert_close(model_output(model, ids), unmerged, rtol=0, atol=1e-4)
    save_adapter(model, tmp_path / "adapter")  # from GPU tensors
    reloaded = load_adapter(BUILDERS[arch]().to(CUDA), tmp_path / "adapter")  # onto a GPU model
    torch.testing.assert_close(model_output(reloaded, ids), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(model_output(load_adapter(BUILDERS[arch](), tmp_path / "adapter"), ids.cpu()),
                               unmerged.cpu(), rtol=0, atol=1e-4)  # and onto a CPU one


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_mixed_batch_on_cuda_equals_each_row_alone(arch, ids, tmp_path, monkeypatch):
    from test_multi_lora import SPECS, make_adapters
    from multi_lora import MultiAdapterModel
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the 1e-5 contract is for fp32 arithmetic
    dirs = make_adapters(arch, tmp_path, SPECS[arch])  # bert: each adapter has its own classifier head
    multi = MultiAdapterModel(BUILDERS[arch]().to(CUDA))
    for name, folder in dirs.items():
        multi.load_adapter(name, folder)
    ids = ids.to(CUDA)
    choice = ["b", None, "a"]
    with multi.rows(choice):
        mixed = multi(input_ids=ids).logits
        if arch == "gpt2":
            generated = multi.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for row, name in enumerate(choice):
        alone = load_adapter(BUILDERS[arch](), dirs[name]) if name else BUILDERS[arch]()
        alone = alone.to(CUDA).eval()
        torch.testing.assert_close(mixed[row], model_output(alone, ids)[row], rtol=0, atol=1e-5)
        if arch == "gpt2":
            single = alone.generate(input_ids=ids[row:row + 1], max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert torch.equal(generated[row], single[0])
