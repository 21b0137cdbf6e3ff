"""Every bad input ends in one line on stderr and exit status 2: no traceback, nothing half-written.

Training data, flags and config files go through train_lora_basic.main; adapter folders through
inference_example.main (--adapter_dir and --adapters) and lora_linear.load_adapter (AdapterError).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import BUILDERS

import inference_example
import train_lora_basic
from lora_linear import AdapterError, apply_lora_to_model, load_adapter, mark_only_lora_as_trainable, save_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(assets, out, train_file, *extra, validation=True):
    args = ["--model", assets["bert"], "--train_file", str(train_file), "--output_dir", str(out),
            "--max_steps", "2", "--max_length", "32", "--device", "cpu"]
    if validation:
        args += ["--validation_file", assets["validation_csv"]]
    return args + list(extra)


def assert_one_line_exit_2(code, err, expected):
    err = err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert expected in err, err


def assert_nothing_written(out):
    """A refused run leaves no file behind (at most the empty folder it checked)."""
    if os.path.isdir(out):
        assert sorted(os.listdir(out)) == [], os.listdir(out)


def refused(capsys, argv, expected, out):
    code = train_lora_basic.main(argv)
    assert_one_line_exit_2(code, capsys.readouterr().err, expected)
    assert_nothing_written(out)


# --------------------------------------------------------------------------- training data

def write(path, text_or_bytes):
    if isinstance(text_or_bytes, bytes):
        path.write_bytes(text_or_bytes)
    else:
        path.write_text(text_or_bytes, encoding="utf-8")
    return path


GOOD_ROWS = [{"sentence": "good fun film", "label": 1}, {"sentence": "dull weak plot", "label": 0}] * 8


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


BAD_DATA = {
    "non_utf8_csv": ("train.csv", b"sentence,label\ngood fun,1\n\xff\xfe bad,0\n", "train.csv line 3: not UTF-8"),
    "mixed_labels": ("train.jsonl", jsonl(GOOD_ROWS + [{"sentence": "fun", "label": "1"}]),
                     "train.jsonl line 17: label '1' is a string, but earlier labels are numbers"),
    "null_label": ("train.jsonl", jsonl(GOOD_ROWS[:3] + [{"sentence": "fun", "label": None}]),
                   "train.jsonl line 4: label None is null"),
    "list_label": ("train.jsonl", jsonl(GOOD_ROWS[:3] + [{"sentence": "fun", "label": [1]}]),
                   "train.jsonl line 4: label [1] is a list"),
    "missing_text_later_row": ("train.jsonl", jsonl(GOOD_ROWS[:5] + [{"text": "fun", "label": 1}]),
                               "train.jsonl line 6: no 'sentence' field"),
    "malformed_line": ("train.jsonl", jsonl(GOOD_ROWS[:2]) + '{"sentence": "fun", "label": 1\n',
                       "train.jsonl line 3: not valid JSON"),
    "object_without_data": ("train.json", json.dumps({"rows": GOOD_ROWS}), 'must hold the examples under "data"'),
    "list_not_of_objects": ("train.json", json.dumps(GOOD_ROWS[:2] + [["fun", 1]]),
                            "train.json item 2: expected an object"),
    "csv_missing_field": ("train.csv", "sentence,label\ngood fun,1\ndull plot\nweak,0\n",
                          "train.csv line 3: 1 field(s) but the header has 2"),
    "null_text": ("train.jsonl", jsonl(GOOD_ROWS[:3] + [{"sentence": None, "label": 1}]),
                  "train.jsonl line 4: 'sentence' is null, not a text"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data_names_the_file_and_line(case, tiny_assets, tmp_path, capsys):
    name, content, expected = BAD_DATA[case]
    path = write(tmp_path / name, content)
    refused(capsys, train_args(tiny_assets, tmp_path / "out", path), expected, tmp_path / "out")


def test_bad_validation_file_is_checked_too(tiny_assets, tmp_path, capsys):
    train = write(tmp_path / "train.jsonl", jsonl(GOOD_ROWS))
    validation = write(tmp_path / "validation.jsonl", jsonl(GOOD_ROWS[:2] + [{"sentence": None, "label": 0}]))
    refused(capsys, train_args(tiny_assets, tmp_path / "out", train, "--validation_file", str(validation),
                               validation=False), "validation.jsonl line 3", tmp_path / "out")


def test_good_jsonl_and_json_still_train(tiny_assets, tmp_path):
    train = write(tmp_path / "train.json", json.dumps({"data": GOOD_ROWS}))
    assert train_lora_basic.main(train_args(tiny_assets, tmp_path / "out", train)) == 0


# --------------------------------------------------------------------------- model, output_dir, flags, config

def test_max_length_beyond_the_models_positions(tiny_assets, tmp_path, capsys):
    # the tiny BERT has 64 positions; a long text would crash mid-run with a tensor size mismatch
    long_text = write(tmp_path / "train.csv", "sentence,label\n" + "".join(
        f"{'good ' * 80 if i % 2 else 'dull ' * 80},{i % 2}\n" for i in range(16)))
    refused(capsys, train_args(tiny_assets, tmp_path / "out", long_text, "--max_length", "100"),
            "max_length 100 exceeds the 64 positions of this bert model", tmp_path / "out")


def test_num_labels_other_than_the_local_checkpoints_head(tiny_assets, tmp_path, capsys):
    refused(capsys, train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], "--num_labels", "3"),
            "has a 2-label classification head but num_labels is 3", tmp_path / "out")


def test_output_dir_that_is_a_file(tiny_assets, tmp_path, capsys):
    target = write(tmp_path / "a_file", "not a folder")
    for out in (target, target / "run"):
        code = train_lora_basic.main(train_args(tiny_assets, out, tiny_assets["train_csv"]))
        assert_one_line_exit_2(code, capsys.readouterr().err, "cannot be written")
    assert target.read_text() == "not a folder"


def test_output_dir_that_is_not_writable(tiny_assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "read_only"
    out.mkdir()
    real_open = os.open

    def deny(path, *args, **kwargs):  # what a read-only folder answers (root would not see a chmod)
        if str(path).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", deny)
    code = train_lora_basic.main(train_args(tiny_assets, out, tiny_assets["train_csv"]))
    assert_one_line_exit_2(code, capsys.readouterr().err, "cannot be written (Permission denied)")
    assert_nothing_written(out)


@pytest.mark.parametrize("extra, expected", [
    (["--rank", "1e30"], "invalid value for 'rank'"),
    (["--learning_rate", "inf"], "invalid value for 'learning_rate'"),
    (["--learning_rate", "nan"], "invalid value for 'learning_rate'"),
    (["--max_steps", "inf"], "invalid value for 'max_steps'"),
])
def test_absurd_numbers_are_refused(extra, expected, tiny_assets, tmp_path, capsys):
    refused(capsys, train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], *extra), expected,
            tmp_path / "out")


def test_config_values_rank_and_learning_rate_from_yaml(tiny_assets, tmp_path, capsys):
    for text, key in (("lora:\n  rank: 1e30\n", "rank"), ("training:\n  learning_rate: .inf\n", "learning_rate"),
                      ("training:\n  learning_rate: .nan\n", "learning_rate")):
        config = write(tmp_path / "config.yaml", text)
        refused(capsys, train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], "--config", str(config)),
                f"invalid value for '{key}'", tmp_path / "out")


def test_non_utf8_yaml_config(tmp_path):
    config = write(tmp_path / "latin1.yaml", "# r\xe9glages\nlora:\n  rank: 8\n".encode("latin-1"))
    result = subprocess.run([sys.executable, "train_lora_basic.py", "--config", str(config)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert_one_line_exit_2(result.returncode, result.stderr, "is not UTF-8 text")


@pytest.mark.parametrize("text, expected", [
    ("rank: 8\n", "unknown config key 'rank' (did you mean 'lora.rank'?)"),  # a leaf one level too high
    ("lora:\n  target_modules: {query: 1}\n", "a list of module names, or all"),
    ("data:\n  text_pair_column: ''\n", "a non-empty string, or null"),
    ("data:\n  text_column: label\n", "a column can be only one of these"),  # the label as its own input
    ("lora:\n  rank: 8\n alpha: 16\n", "is not valid YAML at line 3, column"),
    ("num_labels: 1\n", "invalid value for 'num_labels'"),
])
def test_bad_config_files(text, expected, tiny_assets, tmp_path, capsys):
    config = write(tmp_path / "config.yaml", text)
    refused(capsys, train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], "--config", str(config)),
            expected, tmp_path / "out")


def model_folder_missing(tiny_assets, tmp_path, *missing, config_text=None):
    """A copy of the tiny BERT folder without `missing` files (or with config.json replaced by config_text)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_assets["bert"], folder)
    for name in missing:
        os.remove(folder / name)
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return folder


@pytest.mark.parametrize("missing, config_text, expected", [
    (("config.json",), None, "has no config.json"),
    ((), "[1, 2]", "has a config.json that is not a JSON object"),
    ((), "{not json", "has a config.json that cannot be read"),
    (("model.safetensors",), None, "has no weights (model.safetensors, pytorch_model.bin)"),
])
def test_incomplete_model_folder_is_named_before_loading(missing, config_text, expected, tiny_assets, tmp_path,
                                                          capsys):
    folder = model_folder_missing(tiny_assets, tmp_path, *missing, config_text=config_text)
    args = train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], "--model", str(folder))
    refused(capsys, args, f"model folder '{folder}' {expected}", tmp_path / "out")


def test_truncated_weights_are_a_one_line_error(tiny_assets, tmp_path, capsys):
    folder = model_folder_missing(tiny_assets, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download
    args = train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], "--model", str(folder))
    refused(capsys, args, f"model '{folder}' cannot be loaded as a classification model", tmp_path / "out")


def test_a_model_folder_without_its_tokenizer_is_refused(tiny_assets, tmp_path, capsys):
    folder = model_folder_missing(tiny_assets, tmp_path, "tokenizer.json", "tokenizer_config.json")
    args = train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], "--model", str(folder))
    refused(capsys, args, "its tokenizer has 5 tokens for a model of 29; the tokenizer files", tmp_path / "out")


def test_an_adapter_folder_passed_as_the_model(tiny_runs, tiny_assets, tmp_path, capsys):
    refused(capsys, train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"], "--model", tiny_runs["bert"]),
            "is a LoRA adapter folder, not a model: pass its base model as --model", tmp_path / "out")


def test_an_encoder_as_a_causal_lm(tiny_assets, tmp_path, capsys):
    refused(capsys, train_args(tiny_assets, tmp_path / "out", tiny_assets["train_txt"], "--task", "causal_lm"),
            "is an encoder: every position sees the whole text", tmp_path / "out")


def test_output_dir_that_is_the_model_folder(tiny_assets, tmp_path, capsys):
    folder = model_folder_missing(tiny_assets, tmp_path)
    before = sorted(os.listdir(folder))
    code = train_lora_basic.main(train_args(tiny_assets, folder, tiny_assets["train_csv"], "--model", str(folder)))
    assert_one_line_exit_2(code, capsys.readouterr().err, "output_dir is the model folder")
    assert sorted(os.listdir(folder)) == before


def test_targets_that_match_only_the_classification_head(tiny_assets, tmp_path, capsys):
    code = train_lora_basic.main(train_args(tiny_assets, tmp_path / "out", tiny_assets["train_csv"],
                                            "--target_modules", "classifier"))
    err = capsys.readouterr().err
    assert_one_line_exit_2(code, err, "target_modules match only the classification head (classifier)")
    assert_nothing_written(tmp_path / "out")
    before = err.split("name layers before it: ")[-1]  # the layers it offers, not the head it refused
    assert "query" in before and "classifier" not in before


# --------------------------------------------------------------------------- checkpoints on --resume

@pytest.fixture
def interrupted_run(tiny_assets, tmp_path):
    out = tmp_path / "run"

    def stop(state):
        if state["step"] == 2:
            train_lora_basic.request_stop()
    args = train_args(tiny_assets, out, tiny_assets["train_csv"], "--max_steps", "0", "--epochs", "1")
    assert train_lora_basic.main(args, callbacks=[stop]) == 130
    return out, args


def test_corrupt_trainer_state_on_resume(interrupted_run, capsys):
    out, args = interrupted_run
    state = out / "checkpoint" / "trainer_state.pt"
    size = state.stat().st_size
    state.write_bytes(b"\0" * size)  # same size: it passes the completeness check and fails to load
    capsys.readouterr()
    code = train_lora_basic.main(args + ["--resume"])
    assert_one_line_exit_2(code, capsys.readouterr().err, "trainer_state.pt is corrupt or was not written by this")
    state.write_bytes(b"truncated")  # another size: the checkpoint no longer counts as complete
    code = train_lora_basic.main(args + ["--resume"])
    assert_one_line_exit_2(code, capsys.readouterr().err, "no checkpoint in")
    assert (out / "checkpoint").is_dir()  # refused, not deleted


def test_foreign_trainer_state_on_resume(interrupted_run, capsys):
    out, args = interrupted_run
    folder = out / "checkpoint"
    torch.save({"model": torch.zeros(3), "epoch": 1}, folder / "trainer_state.pt")  # another program's file
    marker = json.loads((folder / "checkpoint_complete.json").read_text())
    marker["files"]["trainer_state.pt"] = (folder / "trainer_state.pt").stat().st_size
    (folder / "checkpoint_complete.json").write_text(json.dumps(marker))
    capsys.readouterr()
    code = train_lora_basic.main(args + ["--resume"])
    assert_one_line_exit_2(code, capsys.readouterr().err, "was not written by this script")


# --------------------------------------------------------------------------- adapter folders

BAD_ADAPTER_VALUES = {
    "r_string": ({"r": "x"}, "r is 'x'"),
    "r_zero": ({"r": 0}, "r is 0"),
    "r_fraction": ({"r": 8.5}, "r is 8.5"),
    "alpha_string": ({"lora_alpha": "abc"}, "lora_alpha is 'abc'"),
    "dropout_negative": ({"lora_dropout": -0.1}, "lora_dropout is -0.1"),
    "dropout_one": ({"lora_dropout": 1.0}, "lora_dropout is 1.0"),
    "targets_missing": ({"target_modules": None}, "target_modules is missing"),
    "targets_number": ({"target_modules": 5}, "target_modules is 5"),
    "targets_list_of_numbers": ({"target_modules": [1, 2]}, "target_modules is [1, 2]"),
    "rank_pattern_not_object": ({"rank_pattern": ["query"]}, "rank_pattern must be an object"),
    "rank_pattern_bad_regex": ({"rank_pattern": {"query(": 4}}, "is not a valid regular expression"),
    "rank_pattern_bad_value": ({"rank_pattern": {"query": 0}}, "rank_pattern['query'] is 0"),
    "alpha_pattern_bad_value": ({"alpha_pattern": {"query": "big"}}, "alpha_pattern['query'] is 'big'"),
    "unknown_bias": ({"bias": "sometimes"}, "bias is 'sometimes'"),
}


def broken_copy(source, folder, changes):
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("final", "logs", "training_*", "model_*"))
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if key == "target_modules" and value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def run_inference(argv, capsys):
    code = inference_example.main(argv + ["--mode", "demo", "--device", "cpu"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(BAD_ADAPTER_VALUES))
def test_bad_adapter_config_value(case, tiny_runs, tmp_path, capsys):
    changes, expected = BAD_ADAPTER_VALUES[case]
    folder = broken_copy(tiny_runs["bert"], tmp_path / "bad", changes)
    with pytest.raises(AdapterError, match=None) as raised:
        load_adapter(BUILDERS["bert"](), folder)
    assert expected in str(raised.value)
    assert_one_line_exit_2(*run_inference(["--adapter_dir", str(folder)], capsys), expected)
    assert_one_line_exit_2(*run_inference(["--adapters", f"good={tiny_runs['bert']}", f"bad={folder}"], capsys),
                           expected)


@pytest.mark.parametrize("base", ["empty_folder", "not_a_model", "no_such_model"])
def test_base_that_is_not_a_model(base, tiny_runs, tmp_path, capsys):
    target = tmp_path / base
    if base == "empty_folder":
        target.mkdir()
    elif base == "not_a_model":
        target.mkdir()
        (target / "config.json").write_text('{"model_type": "no-such-architecture"}')
    folder = broken_copy(tiny_runs["bert"], tmp_path / "adapter", {"base_model_name_or_path": str(target)})
    code, err = run_inference(["--adapter_dir", str(folder)], capsys)
    assert_one_line_exit_2(code, err, str(target) if base != "no_such_model" else "")
    code, err = run_inference(["--adapters", f"a={folder}"], capsys)
    assert_one_line_exit_2(code, err, "")


def test_load_adapter_on_something_that_is_not_a_model(tiny_runs):
    with pytest.raises(AdapterError, match="needs the base model"):
        load_adapter("bert-base-uncased", tiny_runs["bert"])


def test_adapter_names_for_several_adapters(tiny_runs, capsys):
    for pairs in ([f"={tiny_runs['bert']}"], [f"a={tiny_runs['bert']}", f"a={tiny_runs['bert']}"]):
        assert_one_line_exit_2(*run_inference(["--adapters", *pairs], capsys), "--adapters")


def test_older_adapter_model_bin_loads_and_pickled_code_never_runs(ids, tmp_path, capsys):
    model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS["bert"](), ["query", "value"], rank=4))
    torch.nn.init.normal_(model.classifier.weight)
    save_adapter(model, tmp_path / "a")
    from safetensors.torch import load_file
    torch.save(load_file(tmp_path / "a" / "adapter_model.safetensors"), tmp_path / "a" / "adapter_model.bin")
    os.remove(tmp_path / "a" / "adapter_model.safetensors")  # what older PEFT wrote
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(BUILDERS["bert"](), tmp_path / "a")(input_ids=ids).logits,
                                   model.eval()(input_ids=ids).logits, rtol=0, atol=1e-6)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    torch.save({"x": Evil()}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="never unpickled"):
        load_adapter(BUILDERS["bert"](), tmp_path / "a")
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- compare_ranks

def fake_run(folder, rank, metric, value, task="classification"):
    """A training_metrics.json with the fields compare_ranks reads (no training needed)."""
    folder.mkdir(parents=True)
    metrics = {"config": {"lora": {"rank": rank, "alpha": 16.0, "target_modules": ["query", "value"],
                                   "scaling": "standard"}, "training": {"learning_rate": 1e-3}, "task": task},
               "precision": "fp32", "parameters": {"trainable": 1000 * rank},
               "best": {"metric_name": metric, "value": value}, "train_time_s": 1.0, "peak_memory_mb": 10.0}
    (folder / "training_metrics.json").write_text(json.dumps(metrics))


def test_compare_ranks_skips_broken_runs_with_a_warning(tmp_path, capsys):
    import utils
    fake_run(tmp_path / "rank_4", 4, "accuracy", 0.8)
    fake_run(tmp_path / "rank_8", 8, "accuracy", 0.9)
    (tmp_path / "bad_utf8").mkdir()
    (tmp_path / "bad_utf8" / "training_metrics.json").write_bytes(b'{"config": "\xff\xfe"}')
    fake_run(tmp_path / "null_best", 2, "accuracy", None)
    assert utils.main(["compare_ranks", "--results_dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.out.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and any("bad_utf8" in w for w in warnings) and any("null_best" in w for w in warnings)
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("rank_")]
    assert [r[0] for r in rows] == ["rank_4", "rank_8"] and "Traceback" not in captured.err


def test_compare_ranks_names_the_metric_of_every_run(tmp_path, capsys):
    import utils
    fake_run(tmp_path / "sst_rank_4", 4, "accuracy", 0.8)
    fake_run(tmp_path / "lm_rank_8", 8, "perplexity", 35.2, task="causal_lm")
    assert utils.main(["compare_ranks", "--results_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("run"))
    assert "accuracy" not in header and "perplexity" not in header  # never one label over mixed metrics
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "_rank_" in line}
    assert rows["sst_rank_4"][5:7] == ["accuracy", "0.8000"] and rows["lm_rank_8"][5:7] == ["perplexity", "35.2000"]
    assert "different metrics" in out


# --------------------------------------------------------------------------- multi_lora names and bases

@pytest.fixture
def two_adapters(tmp_path):
    dirs = {}
    for name, base in (("a", "org/base-one"), ("b", "org/base-two")):
        model = mark_only_lora_as_trainable(apply_lora_to_model(BUILDERS["bert"](), ["query"], rank=2))
        save_adapter(model, tmp_path / name, base_model_name_or_path=base)
        dirs[name] = tmp_path / name
    return dirs


def test_multi_lora_refuses_deleting_the_base_and_bad_names(two_adapters):
    from multi_lora import MultiAdapterModel
    multi = MultiAdapterModel(BUILDERS["bert"](), base_model_name_or_path="org/base-one")
    multi.load_adapter("a", two_adapters["a"])
    for base in (None, 0):
        with pytest.raises(ValueError, match="base model and cannot be deleted"):
            multi.delete_adapter(base)
    assert multi.names == [None, "a"]
    for name in ("", "   ", None, 3, ("a",)):
        with pytest.raises(ValueError, match="non-empty string"):
            multi.load_adapter(name, two_adapters["a"])
    assert multi.adapters == ["a"]


def test_multi_lora_warns_on_an_adapter_for_another_base(two_adapters, recwarn):
    from multi_lora import MultiAdapterModel
    multi = MultiAdapterModel(BUILDERS["bert"](), base_model_name_or_path="org/base-one")
    multi.load_adapter("a", two_adapters["a"])
    assert not [w for w in recwarn if "trained on" in str(w.message)]
    with pytest.warns(UserWarning, match="'b' was trained on 'org/base-two', but this base model is 'org/base-one'"):
        multi.load_adapter("b", two_adapters["b"])
    # no base name given: the first adapter's base is the reference
    multi = MultiAdapterModel(BUILDERS["bert"]()).load_adapter("a", two_adapters["a"])
    with pytest.warns(UserWarning, match="trained on 'org/base-two'"):
        multi.load_adapter("b", two_adapters["b"])
