"""The benchmark runs end to end on a tiny model (its numbers are checked by reading RESULTS.md, not here)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow
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
    # each ratio is computed against its section's reference row, as recorded
    value = {(r["section"], r["contender"]): r["value"] for r in rows}
    floor = value[("step", "floor: all frozen, grads through every layer")]
    base = value[("inference", "base model")]
    full = value[("memory", "full, batch 2 x 16")]
    for r in rows:
        expected = {"step": f"{r['value'] / floor:.2f}x floor", "inference": f"{r['value'] / base:.3f}x base",
                    "memory": f"full/this = {full / r['value']:.2f}x"}.get(r["section"])
        if expected and not r["contender"].startswith("one "):  # not the bf16 matmul note (its own ratio)
            assert r["ratio"] == expected, r


@pytest.mark.slow
@pytest.mark.integration
def test_precision_and_end_to_end_sections_run_the_real_commands(tmp_path):
    import bench
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--only", "precision", "e2e", "--seeds", "42", "--output", str(out)]) == 0
    rows = {(r["section"], r["contender"]): r for r in json.loads(out.read_text())["rows"]}
    ours = rows[("e2e", "this repo (train_lora_basic.py), fp32")]
    trainer = rows[("e2e", "HF Trainer + PEFT, fp32")]
    assert ours["value"] > 0 and trainer["value"] > 0
    # the ratio is this repo's time over the Trainer's, both as recorded
    assert ours["ratio"].startswith(f"{ours['value'] / trainer['value']:.2f}x Trainer (fp32); accuracy ")
    # --quick evaluates 32 sentences: an accuracy is a count of right answers over 32
    accuracy = rows[("precision", "fp32: best accuracy, mean over seeds")]["value"]
    assert accuracy * 32 == pytest.approx(round(accuracy * 32), abs=1e-9)
    # the precision section's fp32 run at seed 42 is the e2e section's fp32 run (same command, seed 42 is the
    # default): the two sections must report the same accuracy for it
    assert ours["ratio"].endswith(f"over 1 seed(s): {accuracy:.4f}")
    # the floor row: this repo's ratio over the tokens ratio, as recorded
    floor = rows[("e2e", "batching floor: tokens computed, length-grouped / random batches")]
    assert floor["ratio"].endswith(f"= {ours['value'] / trainer['value'] / floor['value']:.3f}x the floor")
    assert rows[("precision", "fp32: best accuracy, mean over seeds")]["ratio"].endswith(f"seeds 42: {accuracy:.4f}")
