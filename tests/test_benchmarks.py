"""The benchmark runs end to end on a tiny model (its numbers are checked by reading RESULTS.md, not here)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_benchmark_runs_on_a_tiny_model(tmp_path):
    import bench
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--only", "step", "inference", "memory", "multi", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    names = {(r["section"], r["contender"]) for r in rows}
    assert ("step", "this repo LoRA r=8 q,v (fp32)") in names and ("step", "full fine-tuning (fp32)") in names
    assert ("inference", "LoRA merged") in names and ("multi", "seq 8: one mixed batch (multi_lora)") in names
    assert ("memory", "lora, batch 2 x 16") in names  # one child process per setup
    assert all(r["value"] > 0 for r in rows)


def test_precision_and_end_to_end_sections_run_the_real_commands(tmp_path):
    import bench
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--only", "precision", "e2e", "--seeds", "42", "--output", str(out)]) == 0
    rows = {(r["section"], r["contender"]): r for r in json.loads(out.read_text())["rows"]}
    accuracy = rows[("precision", "fp32: best accuracy, mean over seeds")]["value"]
    assert 0.0 <= accuracy <= 1.0
    assert "1.00x Trainer (fp32)" in rows[("e2e", "HF Trainer + PEFT, fp32")]["ratio"]
    assert rows[("e2e", "this repo (train_lora_basic.py), fp32")]["value"] > 0
