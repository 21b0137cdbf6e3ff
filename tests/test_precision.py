"""precision: auto is decided by timing the job's own steps where the device has a native half precision."""
import json
import platform

import pytest
import torch

import precision
import train_lora_basic
from conftest import tiny_bert
from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable
from test_training import bert_args

CPU = torch.device("cpu")


def test_auto_is_fp32_without_a_native_half_precision(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    never = lambda candidate: pytest.fail("nothing to measure: fp32 is the only fast candidate")  # noqa: E731
    assert precision.choose_precision("auto", CPU, never)[0] == "fp32"


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [(1.0, 0.5, "bf16"), (1.0, 0.9, "bf16"), (0.5, 1.0, "fp32"),
                                                     (1.0, 0.95, "fp32")])  # a near tie: fp32, the exact one
def test_auto_picks_the_faster_measured_candidate(monkeypatch, fp32_s, bf16_s, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    seconds = {"fp32": fp32_s, "bf16": bf16_s}
    chosen, reason = precision.choose_precision("auto", CPU, seconds.get)
    assert chosen == expected
    assert f"fp32 {fp32_s * 1000:.0f} ms" in reason and f"bf16 {bf16_s * 1000:.0f} ms" in reason
    assert ("not at least 10% faster" in reason) == (expected == "fp32")
    assert precision.choose_precision("fp32", CPU, seconds.get) == ("fp32", "set in the config")


def test_measuring_a_step_leaves_no_trace():
    model = mark_only_lora_as_trainable(apply_lora_to_model(tiny_bert(), ["query", "value"], rank=4, dropout=0.2))
    model.train()
    for name, param in model.named_parameters():  # B = 0 would hide a changed weight
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = {"input_ids": torch.randint(5, 90, (4, 12)), "labels": torch.tensor([0, 1, 0, 1])}
    torch.manual_seed(3)
    expected_draw = torch.rand(3)
    torch.manual_seed(3)
    assert precision.seconds_per_training_step(model, batch, "fp32", CPU) > 0
    assert torch.equal(torch.rand(3), expected_draw)  # dropout masks drawn afterwards are the unmeasured run's
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def measured_run(tiny_assets, out, monkeypatch, seconds, *extra):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    calls = []

    def fake_seconds(model, batch, candidate, device):
        calls.append(candidate)
        return seconds[candidate]
    monkeypatch.setattr(train_lora_basic, "seconds_per_training_step", fake_seconds)
    code = train_lora_basic.main(bert_args(tiny_assets, out, "--epochs", "2", "--precision", "auto", *extra))
    return code, calls


@pytest.mark.parametrize("seconds, chosen", [({"fp32": 2.0, "bf16": 1.0}, "bf16"),
                                             ({"fp32": 1.0, "bf16": 2.0}, "fp32")])
def test_auto_run_records_the_measured_choice(tiny_assets, tmp_path, monkeypatch, seconds, chosen):
    code, calls = measured_run(tiny_assets, tmp_path / "run", monkeypatch, seconds)
    assert code == 0 and sorted(calls) == ["bf16", "fp32"]
    metrics = json.loads((tmp_path / "run" / "training_metrics.json").read_text())
    assert metrics["precision"] == chosen and "ms per step" in metrics["precision_reason"]
    assert metrics["config"]["training"]["base_dtype"] == chosen  # base_dtype auto follows the choice
    assert f"precision: {chosen} (auto: " in (tmp_path / "run" / "training_log.txt").read_text()


@pytest.mark.parametrize("tokens", [1024, 64, 1])
def test_auto_times_whole_longest_rows_up_to_the_token_cap(tiny_assets, tmp_path, monkeypatch, tokens):
    """The timed batch: the longest rows, as many as fit PRECISION_TRIAL_TOKENS (at least one), never more than
    a batch; the fp32 trial of a full causal-LM batch would hold more memory than the run itself."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(train_lora_basic, "PRECISION_TRIAL_TOKENS", tokens)
    shapes = []

    def fake_seconds(model, batch, candidate, device):
        shapes.append(tuple(batch["input_ids"].shape))
        return {"fp32": 2.0, "bf16": 1.0}[candidate]
    monkeypatch.setattr(train_lora_basic, "seconds_per_training_step", fake_seconds)
    lengths, measure = [], train_lora_basic.measure_precision

    def spy(model, step_model, train_set, *args):
        lengths.extend(len(e["input_ids"]) for e in train_set)
        return measure(model, step_model, train_set, *args)
    monkeypatch.setattr(train_lora_basic, "measure_precision", spy)
    assert train_lora_basic.main(bert_args(tiny_assets, tmp_path / "run", "--epochs", "1", "--precision", "auto")) == 0
    (rows, length), = set(shapes)
    assert rows == min(16, max(1, tokens // length))  # bert_args: batch 16
    assert length == max(lengths) and len(set(lengths)) > 1  # the longest rows of sentences of several lengths


def test_a_resumed_auto_run_keeps_its_precision_without_measuring_again(tiny_assets, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def stop_at_step_3(state):
        if state["step"] == 3:
            train_lora_basic.request_stop()
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(train_lora_basic, "seconds_per_training_step",
                        lambda model, batch, candidate, device: {"fp32": 2.0, "bf16": 1.0}[candidate])
    assert train_lora_basic.main(bert_args(tiny_assets, out, "--epochs", "2", "--precision", "auto"),
                                 callbacks=[stop_at_step_3]) == 130
    # the same job now measures the other way round: a resumed run must not switch (nor refuse to resume)
    code, calls = measured_run(tiny_assets, out, monkeypatch, {"fp32": 1.0, "bf16": 2.0}, "--resume")
    assert code == 0 and calls == []
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert (metrics["precision"], metrics["config"]["training"]["base_dtype"]) == ("bf16", "bf16")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_after_keep_freed_memory_for_reuse_a_freed_block_stays_with_the_process():
    """glibc returns a freed 16 MB block to the OS by default (mmap, or a trim of the heap's top); a CPU
    training run tells it to keep such blocks, so the next step reuses them without page faults."""
    import psutil
    assert precision.keep_freed_memory_for_reuse()
    process = psutil.Process()
    block = torch.ones(4 * 2 ** 20)  # 16 MB, every page touched
    held = process.memory_info().rss
    del block
    assert held - process.memory_info().rss < 2 ** 20  # less than 1 MB of the 16 went back
