"""The benchmark runs end to end on a tiny model (its numbers are checked by reading RESULTS.md, not here), and the
harness it shares with experiments/ measures and records what it says."""
import datetime
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def allocate(megabytes: int) -> dict:
    """A child for harness.measure_in_child: holds `megabytes` more while its peak memory is measured."""
    from harness import peak_memory_during

    def run():
        block = b"\x01" * (megabytes * 2**20)  # written, so every page is resident
        time.sleep(0.2)  # the sampler reads RSS every 2 ms
        del block
    return {"peak_mb": peak_memory_during(run)}


def test_a_child_that_allocates_200_mb_more_has_a_peak_200_mb_higher():
    from harness import measure_in_child
    target = os.path.relpath(os.path.abspath(__file__), ROOT) + ":allocate"
    idle = measure_in_child(target, megabytes=0)["peak_mb"]
    busy = measure_in_child(target, megabytes=200)["peak_mb"]
    assert 180 < busy - idle < 240, (idle, busy)


def test_a_failing_child_says_why():
    from harness import measure_in_child
    target = os.path.relpath(os.path.abspath(__file__), ROOT) + ":allocate"
    with pytest.raises(RuntimeError, match="unexpected keyword argument 'gigabytes'"):
        measure_in_child(target, gigabytes=1)


def test_timed_rounds_alternates_the_contenders_and_leaves_out_the_warmup():
    from harness import timed_rounds
    calls = []

    def contender(name, first_call_sleep):
        def call():
            if name not in calls:
                time.sleep(first_call_sleep)  # only the first call, a warm-up one, is slow
            calls.append(name)
        return call
    medians = timed_rounds({"a": contender("a", 0.3), "b": contender("b", 0.0)}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(medians) == {"a", "b"} and medians["a"] < 0.1


def test_write_results_writes_the_header_then_the_figures(tmp_path):
    from harness import write_results
    path = tmp_path / "new folder" / "results.json"
    write_results(str(path), {"rows": [{"value": 1.5}]}, command="python benchmarks/bench.py --quick", seeds=[42, 43])
    saved = json.loads(path.read_text())
    assert list(saved) == ["command", "git", "machine", "versions", "date_utc", "seeds", "command_seconds", "rows"]
    import harness  # the command's run time so far: since harness was imported, at most this test session's
    assert 0 < saved["command_seconds"] <= time.perf_counter() - harness.STARTED + 0.1
    assert saved["command"] == "python benchmarks/bench.py --quick" and saved["seeds"] == [42, 43]
    assert saved["rows"] == [{"value": 1.5}]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert saved["git"]["commit"] == head.stdout.strip() and isinstance(saved["git"]["dirty"], bool)
    assert saved["machine"]["description"] and saved["machine"]["device"] == "cpu"
    assert isinstance(saved["machine"]["native_cpu_bf16"], bool) and saved["machine"]["auto_precision"]
    assert saved["versions"]["torch"] and saved["versions"]["python"]
    written = datetime.datetime.fromisoformat(saved["date_utc"])
    assert written.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - written) < datetime.timedelta(minutes=5)
    assert os.listdir(path.parent) == ["results.json"]  # written atomically: no temporary file left
    with pytest.raises(ValueError, match="seeds"):
        write_results(str(path), {"seeds": [42]})  # the figures cannot overwrite the header


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
def test_tests_section_times_pytest_and_only_on_request(tmp_path):
    import bench
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--only", "tests", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["contender"] for r in rows] == ["pytest -q -m 'not slow'", "pytest -q"]
    for r in rows:  # pytest's own summary, and a wall time that includes pytest's own timing of the tests
        passed = r["ratio"].split(" in ")
        assert passed[0].endswith("passed") and r["value"] >= float(passed[1].rstrip("s"))
    default = bench.build_parser().parse_args([]).only  # a plain run: every section but those on request
    assert {"tests", "sst2_epoch"} == set(bench.ON_REQUEST)
    assert not set(default) & set(bench.ON_REQUEST) and set(default) | set(bench.ON_REQUEST) == set(bench.SECTIONS)


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
    assert ours["ratio"].startswith(f"{ours['value'] / trainer['value']:.2f}x Trainer (fp32); ")  # (then bf16's)
    # --quick evaluates 32 sentences: an accuracy is a count of right answers over 32
    accuracy = rows[("precision", "fp32: best accuracy, mean over seeds")]["value"]
    assert accuracy * 32 == pytest.approx(round(accuracy * 32), abs=1e-9)
    # the precision section's fp32 run at seed 42 is the e2e section's fp32 run (same command, seed 42 is the
    # default): the two sections must report the same accuracy for it
    assert ours["ratio"].endswith(f"over 1 seed(s): {accuracy:.4f}; precision per seed: fp32")
    # the floor row: this repo's ratio over the tokens ratio, as recorded
    floor = rows[("e2e", "batching floor: tokens computed, length-grouped / random batches")]
    assert floor["ratio"].endswith(f"= {ours['value'] / trainer['value'] / floor['value']:.3f}x the floor")
    assert rows[("precision", "fp32: best accuracy, mean over seeds")]["ratio"].endswith(f"seeds 42: {accuracy:.4f}")


@pytest.mark.integration
def test_the_sst2_sized_epoch_repeats_the_bundled_sentences_offline(tmp_path, monkeypatch):
    import csv
    import assets
    import bench
    import sources
    monkeypatch.setattr(sources, "hub_reachable", lambda: False)
    train_file, validation_file, what = bench.sst2_sized_files(str(tmp_path), rows=9000, seed=42)
    train, validation = assets.rotten_tomatoes(seed=42)
    with open(train_file, newline="") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 9000 and "repeated to 9,000" in what
    # every bundled training sentence, in order, then again from the start: no validation sentence among them
    assert [r["sentence"] for r in written[:len(train)]] == [r["sentence"] for r in train]
    assert written[len(train)] == {"sentence": train[0]["sentence"], "label": str(train[0]["label"])}
    with open(validation_file, newline="") as f:
        assert [r["sentence"] for r in csv.DictReader(f)] == [r["sentence"] for r in validation]


@pytest.mark.slow
@pytest.mark.integration
def test_the_sst2_sized_epoch_section_runs_both_sides_on_the_same_files(tmp_path):
    import bench
    out = tmp_path / "results.json"
    assert bench.main(["--quick", "--only", "sst2_epoch", "--seeds", "42", "--output", str(out)]) == 0
    rows = {r["contender"]: r for r in json.loads(out.read_text())["rows"]}
    assert {"this repo, the defaults", "this repo, --compile", "HF Trainer + PEFT, fp32"} <= set(rows)
    trainer = rows["HF Trainer + PEFT, fp32"]["value"]
    for row in rows.values():  # each ratio is the row's time over the Trainer's, as recorded
        assert row["ratio"].startswith(f"{row['value'] / trainer:.2f}x Trainer (fp32)")
        assert "over 1 seed(s)" in row["ratio"]
