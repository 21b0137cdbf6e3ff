"""End-to-end training runs on tiny random models and toy local files (no network)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_lora_basic
from lora_linear import load_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# precision auto times fp32 against bf16 on a CPU with native bf16, and a near tie can go either way: tests that
# compare two runs pin it (test_precision covers auto; a later --precision in extra wins)
PINNED = ("--precision", "fp32")


def bert_args(assets, out, *extra):
    return ["--model", assets["bert"], "--train_file", assets["train_csv"], "--validation_file",
            assets["validation_csv"], "--output_dir", str(out), "--epochs", "3", "--batch_size", "16",
            "--lr", "1e-2", "--logging_steps", "2", "--max_length", "32", "--device", "cpu", *PINNED, *extra]


def gpt2_args(assets, out, *extra):
    return ["--model", assets["gpt2"], "--task", "causal_lm", "--target_modules", "c_attn",
            "--train_file", assets["train_txt"], "--validation_file", assets["validation_txt"],
            "--output_dir", str(out), "--epochs", "2", "--batch_size", "4", "--lr", "5e-3",
            "--max_length", "32", "--logging_steps", "2", "--group_by_length", "false", "--device", "cpu", *PINNED,
            *extra]


def metrics_of(out):
    with open(os.path.join(out, "training_metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_classification_run_writes_everything_and_learns(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert train_lora_basic.main(bert_args(tiny_assets, out)) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "final/adapter_model.safetensors",
                 "training_curves.png", "training_metrics.json", "training_log.txt", "model_comparison.txt"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint").exists() and not (out / ".lock").exists()
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "logs"))
    metrics = metrics_of(out)
    epochs = metrics["epochs"]
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"] and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert metrics["best"]["metric_name"] == "accuracy" and metrics["best"]["value"] > 0.6
    assert metrics["parameters"]["lora"] == 2 * 2 * 8 * (32 + 32)
    assert metrics["provenance"]["model"]["source"] == "local folder"
    assert "reduction" in (out / "model_comparison.txt").read_text()
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_saved_adapter_reloads_to_the_same_eval_metric(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert train_lora_basic.main(bert_args(tiny_assets, out)) == 0
    assert single_process_accuracy(tiny_assets, out) == pytest.approx(metrics_of(out)["best"]["value"], abs=1e-9)


def single_process_accuracy(assets, out):
    """The validation accuracy of the adapter saved in `out`, loaded onto a fresh base and evaluated here."""
    from data import build_datasets, make_loader
    from config import build_arg_parser, load_config
    from sources import load_base_model
    config = load_config(build_arg_parser("").parse_args(bert_args(assets, out)))
    model, tokenizer, _ = load_base_model(config["model_name"], "classification", 2)
    load_adapter(model, out)
    _, eval_set, collate, _, _ = build_datasets(config, tokenizer)
    loader = make_loader(eval_set, collate, 64, False, True, 0)
    return train_lora_basic.evaluate(model, loader, "classification", torch.device("cpu"), "fp32", 1, False)["accuracy"]


@pytest.mark.slow
def test_causal_lm_run_reports_perplexity_and_learns(tiny_assets, tmp_path):
    out = tmp_path / "lm"
    assert train_lora_basic.main(gpt2_args(tiny_assets, out)) == 0
    metrics = metrics_of(out)
    assert metrics["best"]["metric_name"] == "perplexity"
    epochs = metrics["epochs"]
    assert epochs[-1]["eval_loss"] < epochs[0]["eval_loss"] and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["eval_perplexity"] == pytest.approx(2.718281828 ** epochs[-1]["eval_loss"], rel=1e-6)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["target_modules"] == ["c_attn"]


@pytest.mark.slow
def test_interrupted_then_resumed_run_matches_uninterrupted(tiny_assets, tmp_path):
    full = tmp_path / "full"
    assert train_lora_basic.main(bert_args(tiny_assets, full, "--dropout", "0.1")) == 0
    part = tmp_path / "part"

    def stop_at_step_7(state):  # what Ctrl-C does: ask the loop to stop after this optimizer step
        if state["step"] == 7:
            train_lora_basic.request_stop()
    assert train_lora_basic.main(bert_args(tiny_assets, part, "--dropout", "0.1"), callbacks=[stop_at_step_7]) == 130
    assert (part / "checkpoint" / "trainer_state.pt").is_file()
    assert train_lora_basic.main(bert_args(tiny_assets, part, "--dropout", "0.1", "--resume")) == 0
    from safetensors.torch import load_file
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(part / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert metrics_of(part)["best"]["value"] == metrics_of(full)["best"]["value"]


def test_a_resumed_run_reports_the_wall_time_and_peak_of_all_its_processes(tiny_assets, tmp_path):
    import time
    part = tmp_path / "part"

    def stop_at_step_2(state):
        if state["step"] == 2:
            train_lora_basic.request_stop()
    assert train_lora_basic.main(bert_args(tiny_assets, part, "--max_steps", "4"), callbacks=[stop_at_step_2]) == 130
    folder = part / "checkpoint"
    saved = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert saved["state"]["wall_time_s"] > 0 and saved["state"]["peak_memory_mb"] > 0  # the first process's
    # as if the first process had run for 1,000 s and peaked at 1 TB: the report must count them
    saved["state"].update(wall_time_s=1000.0, peak_memory_mb=1e6)
    torch.save(saved, folder / "trainer_state.pt")
    marker = json.loads((folder / "checkpoint_complete.json").read_text())
    marker["files"]["trainer_state.pt"] = (folder / "trainer_state.pt").stat().st_size
    (folder / "checkpoint_complete.json").write_text(json.dumps(marker))
    start = time.time()
    assert train_lora_basic.main(bert_args(tiny_assets, part, "--max_steps", "4", "--resume")) == 0
    metrics = metrics_of(part)
    assert 1000 < metrics["wall_time_s"] <= 1000 + time.time() - start
    assert metrics["peak_memory_mb"] == 1e6


def test_occupied_or_finished_output_dir_is_not_overwritten(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(str(os.getpid()))  # a live process holds it
    assert train_lora_basic.main(bert_args(tiny_assets, out)) == 2
    assert "in use by a running training" in capsys.readouterr().err
    (out / ".lock").unlink()
    assert train_lora_basic.main(bert_args(tiny_assets, out, "--max_steps", "2")) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert train_lora_basic.main(bert_args(tiny_assets, out)) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_adapter(tiny_assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_lora_basic.main(bert_args(tiny_assets, out, "--max_steps", "3")) == 0
    good = (out / "adapter_model.safetensors").read_bytes()
    code = train_lora_basic.main(bert_args(tiny_assets, out, "--overwrite_output_dir", "--lr", "1e30",
                                           "--max_grad_norm", "1e30"))
    err = capsys.readouterr().err
    assert code == 1 and "loss became nan" in err.lower() and "last good adapter" in err
    assert (out / "adapter_model.safetensors").read_bytes() == good


@pytest.mark.parametrize("extra, message", [
    (["--rank", "0"], "invalid value for 'rank'"),
    (["--lr", "-1"], "invalid value for 'learning_rate'"),
    (["--dropout", "1.5"], "invalid value for 'dropout'"),
    (["--precision", "fp8"], "invalid value for 'precision'"),
    (["--base_dtype", "bf16", "--precision", "fp32"], "base_dtype: bf16 needs precision: bf16"),
    (["--task", "translation"], "invalid value for 'task'"),
    (["--train_file", "/nonexistent.csv"], "does not exist"),
    (["--target_modules", "nonexistent"], "matches no layer"),
    (["--label_column", "stars"], "column(s) stars not in the data"),
])
def test_bad_flags_exit_2_with_one_line(tiny_assets, tmp_path, capsys, extra, message):
    assert train_lora_basic.main(bert_args(tiny_assets, tmp_path / "bad", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_bad_config_file_exits_2_before_loading_anything(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("lora:\n  rnak: 8\n")
    result = subprocess.run([sys.executable, "train_lora_basic.py", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown config key 'lora.rnak' (did you mean 'lora.rank'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_shipped_configs_are_valid():
    from config import build_arg_parser, load_config
    for path in ("config.yaml", "configs/gpt2_wikitext.yaml"):
        config = load_config(build_arg_parser("").parse_args(["--config", os.path.join(ROOT, path)]))
        assert config["lora"]["rank"] == 8 and config["lora"]["alpha"] == 16.0
    seed_style = build_arg_parser("").parse_args(["--model", "gpt2", "--epochs", "1", "--lr", "2e-4",
                                                  "--output", "x", "--target_modules", "q", "v"])
    config = load_config(seed_style)
    # --output NAME is the run's name under results/ (the course's `--output rank_8` + `--results_dir ./results`)
    assert (config["model_name"], config["training"]["num_epochs"], config["output_dir"]) == ("gpt2", 1,
                                                                                             os.path.join("results", "x"))
    assert config["training"]["learning_rate"] == 2e-4 and config["lora"]["target_modules"] == ["q", "v"]
    assert config["task"] == "causal_lm"  # --model gpt2 alone picks the GPT-2 track


def test_push_to_hub_without_network_fails_clearly_after_saving(tiny_assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code = train_lora_basic.main(bert_args(tiny_assets, out, "--max_steps", "2", "--push_to_hub",
                                           "--hub_model_id", "someone/tiny-lora"))
    assert code == 1 and "push to the Hub failed" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_assets, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_lora_basic.py", *bert_args(tiny_assets, out, "--epochs", "1", "--eval_batch_size", "16")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = metrics_of(out)
    assert metrics["world_size"] == 2
    assert metrics["epochs"][0]["step"] == 192 // 16 // 2  # each rank took half of the batches
    # evaluation was split over the ranks (4 eval batches of 16) and its sums all-reduced: the accuracy the run
    # reports must be the saved adapter's accuracy on the whole validation set, evaluated here in one process
    assert metrics["best"]["value"] == pytest.approx(single_process_accuracy(tiny_assets, out), abs=1e-9)


@pytest.mark.slow
def test_bf16_autocast_accumulation_and_checkpointing_paths(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert train_lora_basic.main(bert_args(tiny_assets, out, "--epochs", "1", "--precision", "bf16",
                                           "--gradient_accumulation_steps", "4", "--gradient_checkpointing")) == 0
    metrics = metrics_of(out)
    assert metrics["precision"] == "bf16"
    assert metrics["epochs"][0]["step"] == 12 // 4  # 12 batches, one optimizer step per 4
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(out / "adapter_model.safetensors").values())


def test_half_precision_base_trains_fp32_lora_weights_and_head(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert train_lora_basic.main(bert_args(tiny_assets, out, "--max_steps", "4", "--precision", "bf16",
                                           "--base_dtype", "bf16")) == 0
    assert "full model weights (torch.bfloat16)" in (out / "model_comparison.txt").read_text()
    from safetensors.torch import load_file
    saved = load_file(out / "adapter_model.safetensors")
    assert any("classifier" in k for k in saved) and all(t.dtype == torch.float32 for t in saved.values())
    # and it loads back onto a bf16 base, keeping its fp32 LoRA weights there
    from transformers import AutoModelForSequenceClassification
    from lora_linear import load_adapter
    base = AutoModelForSequenceClassification.from_pretrained(tiny_assets["bert"], dtype=torch.bfloat16)
    query = load_adapter(base, str(out)).bert.encoder.layer[0].attention.self.query
    assert query.base_layer.weight.dtype == torch.bfloat16 and query.lora.lora_A.dtype == torch.float32


def test_fp16_on_cpu_is_refused_before_training(tiny_assets, tmp_path, capsys):
    args = [a for a in bert_args(tiny_assets, tmp_path / "run", "--fp16") if a not in PINNED]  # --fp16 alone
    assert train_lora_basic.main(args) == 2
    assert "fp16 autocast needs a GPU" in capsys.readouterr().err


def test_labels_become_0_to_n_minus_1(tiny_assets):
    from transformers import AutoTokenizer
    from data import tokenize_classification
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["bert"])
    rows = [{"t": "good", "y": y} for y in (0, 2, 2, 0)] + [{"t": "bad", "y": -1}]
    examples, label_map = tokenize_classification(rows, tokenizer, ("t", None, "y"), 8)
    assert label_map == {-1: 0, 0: 1, 2: 2} and [e["labels"] for e in examples] == [1, 2, 2, 1, 0]
    _, identity = tokenize_classification(rows[:2] + [{"t": "fun", "y": 1}], tokenizer, ("t", None, "y"), 8)
    assert identity == {0: 0, 1: 1, 2: 2}


def test_causal_lm_data_is_cut_into_full_blocks_without_padding(tiny_assets):
    from transformers import AutoTokenizer
    from data import tokenize_causal_lm
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["gpt2"])
    rows = [{"text": "the movie was good"}, {"text": "  "}, {"text": "a dull plot"}, {"text": "fun and lovely film"}]
    blocks = tokenize_causal_lm(rows, tokenizer, "text", 4)
    stream = []  # the documents joined with the end-of-text token, empty lines skipped
    for row in rows:
        if row["text"].strip():
            stream += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(stream) == 14 and len(blocks) == 14 // 4  # the last 2 tokens do not fill a block: dropped
    assert all(len(b["input_ids"]) == 4 for b in blocks)  # every block full: no padding to train on
    assert [t for b in blocks for t in b["input_ids"]] == stream[:12]


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_one_on_padded_buckets(tiny_assets, tmp_path):
    """--compile: the same losses as eager (padding to a multiple of 32 is masked out), every training batch a
    multiple of 32 tokens long, so a handful of shapes compile."""
    import shutil
    from transformers import AutoConfig
    from config import build_arg_parser, load_config
    from data import build_datasets, make_loader
    # no dropout anywhere: compiled code draws its random masks from another generator than eager code
    model = tmp_path / "bert_without_dropout"
    shutil.copytree(tiny_assets["bert"], model)
    config = AutoConfig.from_pretrained(model)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(model)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = ("--epochs", "1", "--dropout", "0", "--precision", "fp32", "--model", str(model))
    assert train_lora_basic.main(bert_args(tiny_assets, eager, *args)) == 0
    assert train_lora_basic.main(bert_args(tiny_assets, compiled, *args, "--compile")) == 0
    for a, b in zip(metrics_of(eager)["history"]["train"], metrics_of(compiled)["history"]["train"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    config = load_config(build_arg_parser("").parse_args(bert_args(tiny_assets, tmp_path / "x", "--compile")))
    from sources import load_base_model
    _, tokenizer, _ = load_base_model(config["model_name"], "classification")
    train, _, collate, _, _ = build_datasets(config, tokenizer)
    lengths = {batch["input_ids"].shape[1] for batch in make_loader(train, collate, 16, True, True, 0)}
    assert lengths and all(length % 32 == 0 for length in lengths)


@pytest.mark.slow
def test_short_last_window_averages_its_own_micro_batches_and_no_step_is_evaluated_twice(tiny_assets, tmp_path,
                                                                                         monkeypatch):
    divisors = []
    real = train_lora_basic.forward_backward
    monkeypatch.setattr(train_lora_basic, "forward_backward",
                        lambda run, batch, last, in_window: (divisors.append(in_window), real(run, batch, last,
                                                                                                 in_window))[1])
    out = tmp_path / "run"
    assert train_lora_basic.main(bert_args(tiny_assets, out, "--epochs", "1", "--gradient_accumulation_steps", "5",
                                           "--eval_steps", "3")) == 0
    # 12 batches in windows of 5, 5 and 2: each window's gradient is the mean over its own micro-batches
    assert divisors == [5] * 10 + [2] * 2
    # step 3 is both an eval_steps multiple and the epoch's end: evaluated once
    assert [e["step"] for e in metrics_of(out)["history"]["eval"]] == [0, 3]


@pytest.mark.parametrize("device, message", [("mps", "not mps"), ("cuda", "CUDA is not available")])
def test_torchrun_never_falls_back_to_the_cpu_silently(monkeypatch, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # as on a Mac
    from config import ConfigError
    with pytest.raises(ConfigError, match=message):
        train_lora_basic.setup_distributed({"device": device})


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_save_steps_checkpoint_as_if_never_killed(tiny_assets, tmp_path):
    # 12 steps an epoch; checkpoints at steps 5 and 10 (save_steps), 12 (the epoch's end), 15, ...; logging every
    # 3 steps, so the one at step 10 holds step 10's loss, not yet logged, for a resumed run only
    args = ("--dropout", "0.1", "--save_steps", "5", "--logging_steps", "3")
    full = tmp_path / "full"
    assert train_lora_basic.main(bert_args(tiny_assets, full, *args)) == 0
    part = tmp_path / "part"

    def killed_at_step_14(state):  # no Ctrl-C handler runs: the process just ends (OOM, preemption, kill -9)
        if state["step"] == 14:
            raise SystemExit(137)
    with pytest.raises(SystemExit):
        train_lora_basic.main(bert_args(tiny_assets, part, *args), callbacks=[killed_at_step_14])
    marker = json.loads((part / "checkpoint" / "checkpoint_complete.json").read_text())
    assert marker["step"] == 12  # the last checkpoint: steps 13 on are trained again
    assert train_lora_basic.main(bert_args(tiny_assets, part, *args, "--resume")) == 0
    from safetensors.torch import load_file
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(part / "final" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert metrics_of(part)["history"]["train"] == metrics_of(full)["history"]["train"]  # the same logged losses


def test_an_fp16_step_skipped_for_overflow_does_not_advance_the_schedule():
    from types import SimpleNamespace
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=4.0), optimizer=optimizer,
                          scheduler=scheduler, trainable=[weight], config={"training": {"max_grad_norm": 1.0}})
    for grad, moves in ((float("inf"), False), (1.0, True)):
        before, epoch = weight.detach().clone(), scheduler.last_epoch
        run.scaler.scale((weight * grad).sum()).backward()  # as forward_backward does in an fp16 run
        train_lora_basic.optimizer_step(run)
        assert (scheduler.last_epoch == epoch + 1) is moves and (not torch.equal(weight, before)) is moves
