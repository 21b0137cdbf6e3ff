"""inference_example.py on adapters trained for a few steps on tiny models."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import inference_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv, capsys):
    code = inference_example.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_mode_prints_label_and_confidence(tiny_runs, tiny_assets, capsys):
    code, out, _ = run(["--adapter_dir", tiny_runs["bert"], "--mode", "text", "--text", "good great fun",
                        "--device", "cpu"], capsys)
    assert code == 0
    line = out.splitlines()[1].split()
    # the answer, computed here without inference_example.py: the tiny base model plus the adapter, softmax
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from lora_linear import load_adapter, lora_disabled
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["bert"])
    model = load_adapter(AutoModelForSequenceClassification.from_pretrained(tiny_assets["bert"]), tiny_runs["bert"])
    with torch.no_grad():
        probs = model.eval()(**tokenizer(["good great fun"], return_tensors="pt")).logits.softmax(-1)[0]
        with lora_disabled(model):
            base_probs = model(**tokenizer(["good great fun"], return_tensors="pt")).logits.softmax(-1)[0]
    assert f"{base_probs.max().item():.3f}" != f"{probs.max().item():.3f}"  # the adapter changes the answer
    # label names come from the run's training_metrics.json: the toy csv labels are "0" and "1"
    assert line[0] == "adapter" and line[1] == str(probs.argmax().item())
    assert line[3] == f"{probs.max().item():.3f}"


def test_merged_and_unmerged_agree_and_compare_base_shows_both(tiny_runs, capsys):
    args = ["--adapter_dir", tiny_runs["bert"], "--mode", "demo", "--device", "cpu"]
    _, unmerged, _ = run(args, capsys)
    _, merged, _ = run(args + ["--merge"], capsys)
    rows = [line for line in unmerged.splitlines()[1:]]
    assert len(rows) == len(inference_example.DEMO_SENTENCES)
    # predictions equal; confidences agree to the printed precision
    assert [r.split()[:3] for r in rows] == [r.split()[:3] for r in merged.splitlines()[1:]]
    _, both, _ = run(["--adapter_dir", tiny_runs["bert"], "--mode", "text", "--text", "dull plot",
                      "--compare_base", "--device", "cpu"], capsys)
    assert "adapter" in both and "no LoRA" in both


@pytest.mark.slow
def test_interactive_mode_answers_hints_and_quits(tiny_runs):
    result = subprocess.run([sys.executable, "inference_example.py", "--adapter_dir", tiny_runs["bert"],
                             "--device", "cpu"], input="good movie\n\nquit\nnever reached\n", cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "confidence" in result.stdout and "empty input" in result.stdout
    assert result.stdout.count("confidence") == 1  # nothing after quit
    eof = subprocess.run([sys.executable, "inference_example.py", "--adapter_dir", tiny_runs["bert"], "--device", "cpu"],
                         input="", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert eof.returncode == 0 and "Traceback" not in eof.stderr  # Ctrl-D leaves cleanly


def test_causal_lm_adapter_generates_a_seeded_continuation(tiny_runs, capsys):
    args = ["--adapter_dir", tiny_runs["gpt2"], "--mode", "text", "--text", "the movie", "--max_new_tokens", "5",
            "--device", "cpu"]
    code, first, _ = run(args, capsys)
    _, second, _ = run(args, capsys)
    assert code == 0 and first == second and first.splitlines()[1].split()[0] == "adapter"
    assert len(first.splitlines()[1].split("|")[1].split()) > 0


def test_bad_adapters_exit_2_with_one_line(tiny_runs, tiny_assets, tmp_path, capsys):
    def fails(adapter_dir, expected):
        code, _, err = run(["--adapter_dir", str(adapter_dir), "--mode", "demo", "--device", "cpu"], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    fails(tmp_path / "missing", "does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no adapter_config.json")
    wrong = tmp_path / "wrong_base"
    shutil.copytree(tiny_runs["bert"], wrong, ignore=shutil.ignore_patterns("final", "logs"))
    config = json.loads((wrong / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "wide")
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    from transformers import BertConfig, BertForSequenceClassification
    BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64)).save_pretrained(tmp_path / "wide")
    shutil.copy(os.path.join(tiny_assets["bert"], "tokenizer.json"), tmp_path / "wide")
    shutil.copy(os.path.join(tiny_assets["bert"], "tokenizer_config.json"), tmp_path / "wide")
    capsys.readouterr()
    fails(wrong, "shape mismatch")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_runs["bert"], corrupt, ignore=shutil.ignore_patterns("final", "logs"))
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[:100])
    fails(corrupt, "truncated or corrupt")


def test_several_adapters_serve_a_mixed_batch_and_per_input_choice(tiny_runs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_runs["bert"], other, ignore=shutil.ignore_patterns("final", "logs"))
    code, out, _ = run(["--adapters", f"one={tiny_runs['bert']}", f"two={other}", "--mode", "demo",
                        "--device", "cpu"], capsys)
    assert code == 0 and "one mixed batch" in out
    rows = out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["one", "two", "base", "one", "two", "base"]
    # the same adapter under two names answers identically
    assert rows[0].split()[1:3] == run(["--adapter_dir", tiny_runs["bert"], "--mode", "demo", "--device", "cpu"],
                                       capsys)[1].splitlines()[1].split()[1:3]
    code, out, _ = run(["--adapters", f"one={tiny_runs['bert']}", f"two={other}", "--mode", "text",
                        "--text", "two: dull plot", "--device", "cpu"], capsys)
    assert code == 0 and "(two) adapter" in out
    code, _, err = run(["--adapters", f"one={tiny_runs['bert']}", f"lm={tiny_runs['gpt2']}", "--mode", "demo",
                        "--device", "cpu"], capsys)
    assert code == 2 and "must share one base model" in err
