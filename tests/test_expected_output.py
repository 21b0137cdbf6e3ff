"""expected_output/ holds a real run of the README's main command: it parses and its adapter loads."""
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = os.path.join(ROOT, "expected_output")


def test_artifacts_exist_and_parse():
    for name in ("training_curves.png", "training_log.txt", "training_metrics.json", "model_comparison.txt",
                 "adapter_config.json", "adapter_model.safetensors"):
        assert os.path.isfile(os.path.join(EXPECTED, name)), name
    metrics = json.load(open(os.path.join(EXPECTED, "training_metrics.json")))
    assert metrics["best"]["metric_name"] == "accuracy" and metrics["best"]["value"] >= 0.80
    assert len(metrics["epochs"]) == metrics["config"]["training"]["num_epochs"]
    assert metrics["provenance"]["model"]["used"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert open(os.path.join(EXPECTED, "training_curves.png"), "rb").read(4) == b"\x89PNG"
    assert "reduction" in open(os.path.join(EXPECTED, "model_comparison.txt")).read()
    config = json.load(open(os.path.join(EXPECTED, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["target_modules"] == ["query", "value"]


@pytest.mark.integration
@pytest.mark.slow
def test_adapter_loads_on_the_bundled_base_and_classifies():
    import assets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from lora_linear import load_adapter
    folder = assets.model_dir("minilm")
    model = load_adapter(AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2), EXPECTED).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["a wonderful, moving film with a superb cast .", "a dull , lifeless mess ."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1).tolist()
    assert predictions == [1, 0]  # label 1 is positive in the Rotten Tomatoes data
