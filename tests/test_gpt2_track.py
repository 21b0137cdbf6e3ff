"""The GPT-2 track and the course's own commands: roles on every family, GPT-2's fused c_attn, the model
deciding the track, the offline fallback of the same family, sweeps without --output_dir, and the real Hub
code path through a seeded Hugging Face cache."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_lora_basic
import utils
from config import build_arg_parser, load_config
from conftest import model_output, randomize_lora_B, tiny_bert, tiny_gpt2, tiny_llama
from lora_linear import (AdapterError, apply_lora_to_model, count_lora_parameters, load_adapter, lora_layers,
                         mark_only_lora_as_trainable, merge_lora_weights, save_adapter)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leaf_names(model):
    return sorted({n.rsplit(".", 1)[-1] if ".attention.output." not in n else "attention.output.dense"
                   for n, _ in lora_layers(model)})


def tiny_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                                hidden_dim=64, max_position_embeddings=64)).eval()


# --------------------------------------------------------------------------- roles on every family

@pytest.mark.parametrize("build, expected", [
    (tiny_bert, ["attention.output.dense", "key", "query", "value"]),
    (tiny_distilbert, ["k_lin", "out_lin", "q_lin", "v_lin"]),
    (tiny_llama, ["k_proj", "o_proj", "q_proj", "v_proj"]),
])
def test_q_k_v_o_roles_name_the_same_projections_on_every_family(build, expected):
    model = apply_lora_to_model(build(), ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert leaf_names(model) == expected
    assert len(lora_layers(model)) == 2 * 4  # two layers, four projections, nothing else
    assert leaf_names(apply_lora_to_model(build(), ["q", "v"])) == expected[2:]  # the short spellings


def test_default_targets_are_w_q_and_w_v_by_role():
    assert leaf_names(apply_lora_to_model(tiny_bert())) == ["query", "value"]
    assert leaf_names(apply_lora_to_model(tiny_distilbert())) == ["q_lin", "v_lin"]
    assert leaf_names(apply_lora_to_model(tiny_llama())) == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- GPT-2: thirds of c_attn

def gpt2_qv(seed=0):
    model = apply_lora_to_model(tiny_gpt2(seed), ["q_proj", "v_proj"], rank=4, alpha=8)
    randomize_lora_B(model)
    return model


def test_gpt2_q_and_v_adapt_only_their_thirds_of_c_attn_and_k_stays_exactly_the_base():
    model = gpt2_qv()
    layers = dict(lora_layers(model))
    assert sorted(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in layers) == ["attn.c_attn"] * 2
    layer = layers["transformer.h.0.attn.c_attn"]
    assert layer.lora.parts == (True, False, True)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        out, base = layer(x), layer.base_layer(x)
    q, k, v = (slice(0, 32), slice(32, 64), slice(64, 96))
    assert torch.equal(out[..., k], base[..., k])  # bit for bit: K is the pretrained projection
    assert not torch.allclose(out[..., q], base[..., q]) and not torch.allclose(out[..., v], base[..., v])


def test_gpt2_small_q_v_thirds_count_294912_like_the_whole_c_attn():
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        thirds = apply_lora_to_model(GPT2LMHeadModel(GPT2Config()), ["q_proj", "v_proj"], rank=8)
        whole = apply_lora_to_model(GPT2LMHeadModel(GPT2Config()), ["c_attn"], rank=8)
    for model in (thirds, whole):
        mark_only_lora_as_trainable(model)
        assert count_lora_parameters(model)["lora"] == count_lora_parameters(model)["trainable"] == 294_912
    # all three roles together are the plain c_attn layer
    qkv = apply_lora_to_model(tiny_gpt2(), ["q_proj", "k_proj", "v_proj"])
    assert all(layer.lora.parts is None for _, layer in lora_layers(qkv))


def test_gpt2_thirds_merge_exactly_and_leave_k_weights_untouched(ids):
    model = gpt2_qv()
    original = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model)}
    unmerged = model_output(model, ids)
    merge_lora_weights(model)
    torch.testing.assert_close(model_output(model, ids), unmerged, rtol=0, atol=1e-5)
    for name, layer in lora_layers(model):  # Conv1D weight is (in, out): K is the middle third of the columns
        assert torch.equal(layer.base_layer.weight[:, 32:64], original[name][:, 32:64])
        assert not torch.equal(layer.base_layer.weight[:, :32], original[name][:, :32])


def test_gpt2_thirds_adapter_loads_in_peft_with_the_same_logits(ids, tmp_path):
    import peft
    model = gpt2_qv()
    expected = model_output(model, ids)
    save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 16.0, ["c_attn"])  # 2 thirds x r=4
    peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path).eval()
    torch.testing.assert_close(model_output(peft_model, ids), expected, rtol=0, atol=1e-5)
    # back into this repo: onto a bare model (a dense rank-8 c_attn LoRA) and onto the same q,v layers
    torch.testing.assert_close(model_output(load_adapter(tiny_gpt2(), tmp_path), ids), expected, rtol=0, atol=1e-6)
    same = apply_lora_to_model(tiny_gpt2(), ["q_proj", "v_proj"], rank=4, alpha=8)
    torch.testing.assert_close(model_output(load_adapter(same, tmp_path), ids), expected, rtol=0, atol=1e-6)


def test_an_adapter_that_moves_k_does_not_load_into_q_v_thirds(tmp_path):
    whole = apply_lora_to_model(tiny_gpt2(), ["c_attn"], rank=8)
    randomize_lora_B(whole)
    save_adapter(whole, tmp_path)
    with pytest.raises(AdapterError, match="keeps frozen"):
        # the same shapes (2 x rank 4 = rank 8) and scaling (8 / 4 = 16 / 8): only the k block tells them apart
        load_adapter(apply_lora_to_model(tiny_gpt2(), ["q_proj", "v_proj"], rank=4, alpha=8), tmp_path)


def test_unknown_target_exits_2_listing_roles_and_layer_names(tiny_assets, tmp_path, capsys):
    code = train_lora_basic.main(["--model", tiny_assets["gpt2"], "--train_file", tiny_assets["train_txt"],
                                  "--target_modules", "qv_proj", "--output_dir", str(tmp_path / "x"),
                                  "--max_length", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "'qv_proj'" in err and "q_proj, k_proj, v_proj, o_proj" in err and "c_attn" in err and "c_fc" in err
    assert not (tmp_path / "x").exists()  # a refused run leaves no empty folder behind


# --------------------------------------------------------------------------- the model decides the track

def config_of(*argv):
    return load_config(build_arg_parser("").parse_args(list(argv)))


def test_a_causal_lm_checkpoint_picks_the_gpt2_track_from_its_config(tiny_assets):
    config = config_of("--model", tiny_assets["gpt2"], "--rank", "4")
    assert config["task"] == "causal_lm" and "config" in config["track"]["decided_by"]
    assert (config["data"]["dataset_name"], config["data"]["dataset_config"]) == ("wikitext", "wikitext-2-raw-v1")
    assert config["lora"]["target_modules"] is None and config["lora"]["rank"] == 4  # targets: the family's
    assert (config["fallback"]["offline_model"], config["fallback"]["offline_dataset"]) == ("smollm2", "english_text")
    bert = config_of("--model", tiny_assets["bert"])
    assert bert["task"] == "classification" and bert["data"]["dataset_name"] == "glue"
    assert (bert["fallback"]["offline_model"], bert["fallback"]["offline_dataset"]) == ("minilm", "rotten_tomatoes")


def test_with_a_config_file_your_keys_win_and_the_rest_follow_the_family(tiny_assets, tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"model_name: {tiny_assets['gpt2']}\nlora:\n  rank: 4\ntraining:\n  max_length: 64\n")
    config = config_of("--config", str(mine))
    assert config["task"] == "causal_lm" and config["data"]["dataset_name"] == "wikitext"
    assert config["lora"]["rank"] == 4 and config["training"]["max_length"] == 64
    assert config["training"]["learning_rate"] == 2e-4  # the GPT-2 track's value, which mine.yaml did not set
    # a task you set wins over the model's own: GPT-2 as a sequence classifier
    assert config_of("--config", os.path.join(ROOT, "config.yaml"), "--model", tiny_assets["gpt2"])["task"] == \
        "classification"


@pytest.mark.parametrize("name, task", [("gpt2", "causal_lm"), ("distilgpt2", "causal_lm"),
                                        ("gpt2-medium", "causal_lm"), ("bert-base-uncased", "classification"),
                                        ("distilbert-base-uncased", "classification")])
def test_offline_and_not_cached_the_family_is_guessed_from_the_name(name, task, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    config = config_of("--model", name)
    assert config["task"] == task and "name" in config["track"]["decided_by"]
    assert config["fallback"]["offline_model"] == ("smollm2" if task == "causal_lm" else "minilm")


def test_a_path_that_does_not_exist_is_an_error_not_a_fallback(tmp_path, capsys):
    for name in ("./no_such_model", str(tmp_path / "missing"), "models/a/b"):
        assert train_lora_basic.main(["--model", name]) == 2
        err = capsys.readouterr().err
        assert "looks like a path but no such folder exists" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- sweeps as the course writes them

def test_an_alpha_sweep_without_output_dir_keeps_every_run(tiny_assets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--model", tiny_assets["bert"], "--train_file", tiny_assets["train_csv"], "--validation_file",
              tiny_assets["validation_csv"], "--max_steps", "2", "--max_length", "32", "--device", "cpu", "--rank", "8"]
    for alpha in ("4", "8"):
        assert train_lora_basic.main(common + ["--alpha", alpha]) == 0
    assert train_lora_basic.main(common + ["--alpha", "16", "--output", "rank_8"]) == 0
    runs = sorted(os.listdir("results"))  # named by the model and what differs from the track's defaults
    assert len(runs) == 3 and runs[0].startswith("bert_alpha4_max_length-32_") and runs[1].startswith("bert_alpha8_")
    assert runs[2] == "rank_8"
    for run in runs:
        assert os.path.isfile(os.path.join("results", run, "training_metrics.json"))
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join("logs", run)))
    assert os.path.islink("output") and os.path.realpath("output") == os.path.realpath("results/rank_8")
    capsys.readouterr()
    assert utils.main(["compare_ranks", "--results_dir", "./results"]) == 0
    out = capsys.readouterr().out
    assert "3 runs in ./results; varying: alpha" in out


def test_every_run_evaluates_at_step_0_before_any_update(tiny_assets, tmp_path):
    out = tmp_path / "lm"
    assert train_lora_basic.main(["--model", tiny_assets["gpt2"], "--train_file", tiny_assets["train_txt"],
                                  "--validation_file", tiny_assets["validation_txt"], "--output_dir", str(out),
                                  "--max_length", "32", "--batch_size", "4", "--lr", "5e-3", "--max_steps", "12",
                                  "--device", "cpu"]) == 0
    metrics = json.loads((out / "training_metrics.json").read_text())
    first, last = metrics["history"]["eval"][0], metrics["history"]["eval"][-1]
    assert first["step"] == 0 and metrics["initial_eval"] == first
    assert last["perplexity"] < first["perplexity"] and metrics["best"]["step"] > 0
    assert "(before training)" in (out / "training_log.txt").read_text()


# --------------------------------------------------------------------------- the real Hub path, in a seeded cache

def run_script(script, args, hf_home, cwd):
    env = {**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": os.path.join(hf_home, "hub")}
    env.pop("HF_DATASETS_OFFLINE", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_gpt2_from_the_cache_trains_q_v_thirds_and_generates(hf_home, tiny_assets, tmp_path):
    result = run_script("train_lora_basic.py", [
        "--model", "gpt2", "--rank", "8", "--alpha", "16", "--epochs", "1", "--lr", "2e-4",
        "--target_modules", "q_proj", "v_proj", "--train_file", tiny_assets["train_txt"],
        "--validation_file", tiny_assets["validation_txt"], "--max_length", "32", "--batch_size", "8",
        "--device", "cpu"], hf_home, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OFFLINE FALLBACK" not in result.stdout
    run = tmp_path / "results" / os.readlink(tmp_path / "output").split(os.sep)[-1]
    metrics = json.loads((run / "training_metrics.json").read_text())
    assert metrics["provenance"]["model"] == {"requested": "gpt2", "used": "gpt2", "source": "Hugging Face local cache"}
    assert metrics["config"]["task"] == "causal_lm"
    assert metrics["adapted_layers"] == "c_attn[q,v]" and metrics["best"]["metric_name"] == "perplexity"
    assert "c_attn (q, v slices) x 2" in (run / "training_log.txt").read_text()
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "gpt2" and adapter["fan_in_fan_out"] and adapter["r"] == 16
    generated = run_script("inference_example.py", ["--mode", "text", "--text", "the movie was",
                                                    "--max_new_tokens", "5", "--compare_base"], hf_home, tmp_path)
    assert generated.returncode == 0, generated.stderr[-2000:]
    lines = generated.stdout.splitlines()
    assert any(line.strip().startswith("adapter") and "the movie was|" in line for line in lines)
    assert any(line.strip().startswith("no LoRA") and "the movie was|" in line for line in lines)


@pytest.mark.slow
def test_bert_base_uncased_from_the_cache_trains_a_classifier_and_classifies(hf_home, tiny_assets, tmp_path):
    result = run_script("train_lora_basic.py", [
        "--model", "bert-base-uncased", "--train_file", tiny_assets["train_csv"], "--validation_file",
        tiny_assets["validation_csv"], "--max_length", "32", "--max_steps", "4", "--device", "cpu",
        "--output_dir", str(tmp_path / "bert")], hf_home, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "bert" / "training_metrics.json").read_text())
    assert metrics["provenance"]["model"]["source"] == "Hugging Face local cache"
    assert metrics["config"]["task"] == "classification" and metrics["adapted_layers"] == "query,value"
    adapter = json.loads((tmp_path / "bert" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["base_model_name_or_path"] == "bert-base-uncased"
    answer = run_script("inference_example.py", ["--adapter_dir", str(tmp_path / "bert"), "--mode", "text",
                                                 "--text", "a great fun film"], hf_home, tmp_path)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert "confidence" in answer.stdout and "base model: bert-base-uncased [Hugging Face local cache]" in answer.stderr


def test_a_finished_configuration_is_not_trained_twice_and_resume_finds_its_folder(tiny_assets, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--model", tiny_assets["bert"], "--train_file", tiny_assets["train_csv"], "--max_steps", "2",
              "--max_length", "32", "--device", "cpu"]
    assert train_lora_basic.main(common) == 0
    (folder,) = os.listdir("results")
    metrics = (tmp_path / "results" / folder / "training_metrics.json").read_bytes()
    capsys.readouterr()
    assert train_lora_basic.main(common) == 0  # the course's loop, run again: nothing to do, nothing lost
    assert "already holds a finished run of this configuration" in capsys.readouterr().out
    assert (tmp_path / "results" / folder / "training_metrics.json").read_bytes() == metrics
    assert train_lora_basic.main(common + ["--resume"]) == 2  # same folder, named by the configuration
    assert f"'results/{folder}' has no checkpoint" in capsys.readouterr().err.replace(os.sep, "/")


def test_a_task_other_than_the_models_own_is_in_the_run_name(tiny_assets):
    config = config_of("--config", os.path.join(ROOT, "config.yaml"), "--model", tiny_assets["gpt2"])
    assert "task-classification" in config["output_dir"]
    assert "task-" not in config_of("--model", tiny_assets["gpt2"])["output_dir"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "causal_lm", "--offline_model", "minilm"], "is a classification model but the task is causal_lm"),
])
def test_a_fallback_of_the_wrong_kind_exits_2(tiny_assets, argv, message, capsys):
    assert train_lora_basic.main(["--model", tiny_assets["gpt2"], *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_config_naming_no_known_architecture_asks_for_the_task(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "something_new"}))
    for name in ("model.safetensors", "tokenizer.json"):  # never read: the task is asked for first
        (tmp_path / name).write_text("")
    assert train_lora_basic.main(["--model", str(tmp_path)]) == 2
    assert "pass --task classification or --task causal_lm" in capsys.readouterr().err


def test_a_gpt2_adapter_generates_in_demo_and_interactive_modes_beside_the_base(tiny_runs, monkeypatch, capsys):
    import inference_example
    common = ["--adapter_dir", tiny_runs["gpt2"], "--max_new_tokens", "4", "--temperature", "0", "--compare_base"]
    assert inference_example.main(common + ["--mode", "demo"]) == 0
    out = capsys.readouterr().out
    for prompt in inference_example.DEMO_PROMPTS:
        assert f"> {prompt}" in out and f"adapter  {prompt}|" in out and f"no LoRA  {prompt}|" in out
    answers = iter(["the movie", "quit"])
    monkeypatch.setattr("builtins.input", lambda _: next(answers))
    assert inference_example.main(common + ["--mode", "interactive"]) == 0
    out = capsys.readouterr().out
    assert "a prompt to continue" in out and "adapter  the movie|" in out and "no LoRA  the movie|" in out


def test_a_run_on_the_offline_fallback_has_its_own_folder(monkeypatch):
    import sources
    monkeypatch.setattr(sources, "model_reachable", lambda name: True)  # online, or gpt2 in the cache
    monkeypatch.setattr(sources, "dataset_reachable", lambda name: True)  # and wikitext too
    online = config_of("--model", "gpt2", "--rank", "4")
    monkeypatch.setattr(sources, "dataset_reachable", lambda name: False)  # gpt2 cached, wikitext not
    data_only = config_of("--model", "gpt2", "--rank", "4")
    bert_data_only = config_of("--model", "bert-base-uncased")
    monkeypatch.setattr(sources, "model_reachable", lambda name: False)  # offline: SmolLM2 will be trained
    offline = config_of("--model", "gpt2", "--rank", "4")
    assert online["output_dir"] == os.path.join("results", "gpt2_rank4")
    assert data_only["output_dir"] == os.path.join("results", "gpt2_offline-english_text_rank4")
    assert bert_data_only["output_dir"] == os.path.join("results", "bert-base-uncased_offline-rotten_tomatoes")
    assert offline["output_dir"] == os.path.join("results", "gpt2_offline-smollm2_rank4")
    assert offline["logging_dir"] == os.path.join("logs", "gpt2_offline-smollm2_rank4")
    assert config_of("--model", "gpt2", "--offline_model", "none")["output_dir"] == os.path.join(
        "results", "gpt2_offline-english_text")  # no model fallback asked for; the data still falls back
    assert config_of("--model", "gpt2", "--output_dir", "mine")["output_dir"] == os.path.join("results", "mine")
    # the asset itself is no fallback; the text it trains on offline is
    assert config_of("--model", "smollm2")["output_dir"] == os.path.join("results", "smollm2_offline-english_text")


def test_a_finished_fallback_run_is_not_taken_for_the_real_model_once_it_can_be_had(tmp_path, monkeypatch):
    import argparse
    import run_folder
    (tmp_path / "training_metrics.json").write_text(json.dumps({
        "best": {"metric_name": "perplexity", "value": 52.3},
        "provenance": {"model": {"requested": "gpt2", "used": "HuggingFaceTB/SmolLM2-135M-Instruct", "fallback": True}}}))
    config = {"output_dir": str(tmp_path), "model_name": "gpt2", "track": {"named_by_configuration": True}}
    args = argparse.Namespace(resume=False, overwrite_output_dir=False)
    monkeypatch.setattr(run_folder, "model_reachable", lambda name: False)
    assert run_folder.already_done(config, args) == "perplexity 52.3000"  # still offline: the same run
    monkeypatch.setattr(run_folder, "model_reachable", lambda name: True)
    assert run_folder.already_done(config, args) is None  # GPT-2 itself can be loaded now: train it
    # the real model on the offline data (a folder named before runs on fallback data got their own)
    (tmp_path / "training_metrics.json").write_text(json.dumps({
        "best": {"metric_name": "perplexity", "value": 61.0},
        "provenance": {"model": {"requested": "gpt2", "used": "gpt2"}, "data": {"fallback": True}}}))
    monkeypatch.setattr(run_folder, "dataset_falls_back", lambda config: True)
    assert run_folder.already_done(config, args) == "perplexity 61.0000"  # wikitext still out of reach
    monkeypatch.setattr(run_folder, "dataset_falls_back", lambda config: False)
    assert run_folder.already_done(config, args) is None  # wikitext can be loaded now: train on it
