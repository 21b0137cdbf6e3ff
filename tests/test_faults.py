"""Fault injection: kills at every instruction of the checkpoint swap, interrupted overwrites, non-finite evals.

A kill is simulated in-process by an exception raised instead of the n-th rename or deletion (the disk is then
as a kill -9 at that instruction leaves it), and once for real with SIGKILL in a subprocess. After each fault the
run is resumed, and its training_metrics.json history, epochs and best (what the curves are drawn from) must
equal an uninterrupted run's with the same seed, to the last bit.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import run_folder
import train_lora_basic
import utils
from test_training import PINNED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Killed(BaseException):
    """Stands for kill -9: nothing after the instruction runs (BaseException: no `except Exception` catches it)."""


def run_args(assets, out, *extra):
    # logging every 5 steps with 12 steps per epoch: windows cross epoch ends and interruptions
    return ["--model", assets["bert"], "--train_file", assets["train_csv"], "--validation_file",
            assets["validation_csv"], "--output_dir", str(out), "--epochs", "3", "--batch_size", "16",
            "--lr", "1e-2", "--logging_steps", "5", "--max_length", "32", "--dropout", "0.1", "--device", "cpu",
            *PINNED, *extra]


def outputs(out):
    """What an interrupted and an uninterrupted run must agree on (times and memory excluded)."""
    with open(os.path.join(out, "training_metrics.json")) as f:
        metrics = json.load(f)
    epochs = [{k: v for k, v in e.items() if k != "time_s"} for e in metrics["epochs"]]
    return {"history": metrics["history"], "epochs": epochs, "best": metrics["best"]}


@pytest.fixture(scope="module")
def reference(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_lora_basic.main(run_args(tiny_assets, out)) == 0
    return outputs(out)


def checkpoint_folders(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))


# --------------------------------------------------------------------------- exact resume

@pytest.mark.parametrize("stop_at", [7, 12, 20])  # mid-window, at an epoch end, mid-epoch two
def test_interrupted_and_resumed_run_writes_the_same_metrics(stop_at, reference, tiny_assets, tmp_path):
    out = tmp_path / "run"

    def stop(state):
        if state["step"] == stop_at:
            train_lora_basic.request_stop()
    assert train_lora_basic.main(run_args(tiny_assets, out), callbacks=[stop]) == 130
    assert train_lora_basic.main(run_args(tiny_assets, out, "--resume")) == 0
    assert outputs(out) == reference


# --------------------------------------------------------------------------- kills inside the swap

SECOND_SAVE_OPERATIONS = 8  # 4 atomic file writes, checkpoint -> .old, .new -> checkpoint, .old -> trash, rmtree


@pytest.fixture
def kill_in_second_checkpoint(monkeypatch):
    """kill(n): the n-th rename or deletion of the second save_checkpoint raises Killed (a deletion first removes
    one file, as a kill halfway through it would)."""
    real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, train_lora_basic.save_checkpoint
    counter = {"saves": 0, "ops": 0, "kill_at": None}

    def operation():
        if counter["saves"] == 2:
            counter["ops"] += 1
            return counter["ops"] == counter["kill_at"]
        return False

    def replace(src, dst):
        if operation():
            raise Killed(f"before {src} -> {dst}")
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if operation():
            files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
            if files:
                os.remove(sorted(files)[0])
            raise Killed(f"halfway through deleting {path}")
        return real_rmtree(path, *args, **kwargs)

    def save(*args, **kwargs):
        counter["saves"] += 1
        return real_save(*args, **kwargs)

    def kill(n):
        counter.update(saves=0, ops=0, kill_at=n)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(shutil, "rmtree", rmtree)
        monkeypatch.setattr(train_lora_basic, "save_checkpoint", save)

    def revive():
        monkeypatch.setattr(os, "replace", real_replace)
        monkeypatch.setattr(shutil, "rmtree", real_rmtree)
        monkeypatch.setattr(train_lora_basic, "save_checkpoint", real_save)
        return counter["ops"]
    return kill, revive


@pytest.mark.parametrize("kill_at", range(1, SECOND_SAVE_OPERATIONS + 1))
def test_kill_at_every_instruction_of_the_swap_loses_nothing(kill_at, kill_in_second_checkpoint, reference,
                                                              tiny_assets, tmp_path, capsys):
    kill, revive = kill_in_second_checkpoint
    out = tmp_path / "run"
    kill(kill_at)
    with pytest.raises(Killed):
        train_lora_basic.main(run_args(tiny_assets, out))
    assert revive() == kill_at
    left = checkpoint_folders(out)
    # a fresh start refuses and deletes nothing: the only complete copy may be checkpoint.old or .new
    capsys.readouterr()
    assert train_lora_basic.main(run_args(tiny_assets, out)) == 2
    assert "holds an interrupted run" in capsys.readouterr().err
    assert checkpoint_folders(out) == left
    newest = run_folder.newest_checkpoint(str(out))
    step = run_folder._checkpoint_step(newest)[0]
    # the second checkpoint counts once all its files are written (its marker follows them)
    assert step == (24 if kill_at >= 4 else 12), (left, newest)
    assert train_lora_basic.main(run_args(tiny_assets, out, "--resume")) == 0
    assert f"resumed from step {step}" in (out / "training_log.txt").read_text()
    assert outputs(out) == reference
    assert checkpoint_folders(out) == [] and not [n for n in os.listdir(out) if n.startswith(".trash")]


DRIVER = """
import os, signal, sys, json
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})  # the reference run's thread count: reductions then add up in the same order
import run_folder
import train_lora_basic
argv, kill_src = json.loads(sys.argv[1]), sys.argv[2]
real_replace, saves = os.replace, []
real_save = train_lora_basic.save_checkpoint
def save(*a, **k):
    saves.append(1)
    return real_save(*a, **k)
def replace(src, dst):
    if len(saves) == 2 and os.path.basename(str(src)) == kill_src:
        os.kill(os.getpid(), signal.SIGKILL)  # the real thing: no handler, no finally
    return real_replace(src, dst)
os.replace = replace
train_lora_basic.save_checkpoint = save
train_lora_basic.main(argv)
"""


@pytest.mark.parametrize("kill_before, left", [
    ("checkpoint.new", ["checkpoint.new", "checkpoint.old"]),  # after checkpoint -> .old, before .new -> checkpoint
    ("checkpoint.old", ["checkpoint", "checkpoint.old"]),      # after the swap, before .old is removed
])
def test_real_kill_9_inside_the_swap(kill_before, left, reference, tiny_assets, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", DRIVER.format(root=ROOT, threads=torch.get_num_threads()),
                             json.dumps(run_args(tiny_assets, out)), kill_before], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert checkpoint_folders(out) == left
    assert (out / ".lock").is_file()  # left by the dead process; the next run sees that it is dead
    assert train_lora_basic.main(run_args(tiny_assets, out, "--resume")) == 0
    assert outputs(out) == reference


def test_half_written_checkpoint_new_and_trash_are_ignored(tiny_assets, tmp_path):
    out = tmp_path / "run"

    def stop(state):
        if state["step"] == 5:
            train_lora_basic.request_stop()
    assert train_lora_basic.main(run_args(tiny_assets, out), callbacks=[stop]) == 130
    shutil.copytree(out / "checkpoint", out / "checkpoint.new")
    os.remove(out / "checkpoint.new" / "trainer_state.pt")  # a kill while it was being written
    (out / ".trash-checkpoint.old-1").mkdir()
    assert run_folder.newest_checkpoint(str(out)) == str(out / "checkpoint")
    assert train_lora_basic.main(run_args(tiny_assets, out, "--resume")) == 0
    assert sorted(n for n in os.listdir(out) if n.startswith((".trash", "checkpoint"))) == []


# --------------------------------------------------------------------------- interrupted --overwrite_output_dir

def finished_rank_4(assets, out):
    assert train_lora_basic.main(run_args(assets, out, "--rank", "4", "--max_steps", "3")) == 0
    return {n: (out / n).read_bytes() for n in ("adapter_model.safetensors", "training_metrics.json")}


def compare_ranks_rows(results, capsys):
    capsys.readouterr()
    assert utils.main(["compare_ranks", "--results_dir", str(results)]) == 0
    return [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("run")][1:]


def test_overwrite_killed_before_its_first_result_puts_the_previous_run_back(tiny_assets, tmp_path, monkeypatch,
                                                                             capsys):
    results = tmp_path / "results"
    out = results / "run"
    before = finished_rank_4(tiny_assets, out)
    monkeypatch.setattr(train_lora_basic, "restore_previous_run", lambda d: False)  # kill -9: no handler runs

    def die(state):
        raise Killed
    with pytest.raises(Killed):
        train_lora_basic.main(run_args(tiny_assets, out, "--rank", "2", "--overwrite_output_dir"), callbacks=[die])
    monkeypatch.undo()
    # the old run is aside, not mixed with the new one: compare_ranks lists no rank for the folder
    assert not (out / "training_metrics.json").exists() and (out / ".overwrite-previous").is_dir()
    capsys.readouterr()
    assert utils.main(["compare_ranks", "--results_dir", str(results)]) == 2
    # the next start puts the previous run back (the new one produced nothing) and refuses to clobber it
    assert train_lora_basic.main(run_args(tiny_assets, out, "--rank", "2")) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not (out / ".overwrite-previous").exists()
    assert [row[1] for row in compare_ranks_rows(results, capsys)] == ["4"]


def test_overwrite_killed_after_its_first_result_holds_only_the_new_run(tiny_assets, tmp_path, capsys):
    results = tmp_path / "results"
    out = results / "run"
    finished_rank_4(tiny_assets, out)

    def die(state):
        if state["step"] == 14:  # after the first epoch's eval and checkpoint
            raise Killed
    with pytest.raises(Killed):
        train_lora_basic.main(run_args(tiny_assets, out, "--rank", "2", "--overwrite_output_dir"), callbacks=[die])
    assert not (out / "training_metrics.json").exists() and not (out / ".overwrite-previous").exists()
    from safetensors.torch import load_file
    assert load_file(out / "adapter_model.safetensors")[
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape[0] == 2
    assert train_lora_basic.main(run_args(tiny_assets, out, "--rank", "2", "--resume")) == 0
    assert [row[1] for row in compare_ranks_rows(results, capsys)] == ["2"]


def test_overwrite_killed_while_moving_the_previous_run_aside(tiny_assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    before = finished_rank_4(tiny_assets, out)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise Killed
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(train_lora_basic, "restore_previous_run", lambda d: False)
    with pytest.raises(Killed):
        train_lora_basic.main(run_args(tiny_assets, out, "--overwrite_output_dir"))
    monkeypatch.undo()
    (out / ".lock").write_text("999999999")  # the killed process's lock: a pid that no longer runs
    capsys.readouterr()
    assert train_lora_basic.main(run_args(tiny_assets, out)) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert {n: (out / n).read_bytes() for n in before} == before
    assert train_lora_basic.main(run_args(tiny_assets, out, "--rank", "2", "--max_steps", "2",
                                          "--overwrite_output_dir")) == 0
    assert json.loads((out / "training_metrics.json").read_text())["config"]["lora"]["rank"] == 2


# --------------------------------------------------------------------------- non-finite evaluation

def test_nan_eval_is_never_the_best_and_stops_training(tiny_assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_evaluate, seen = train_lora_basic.evaluate, {}

    def evaluate(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] == 3:  # step 0, epoch 1, then epoch 2's eval: snapshot the last good adapter, go nan
            seen["good"] = (out / "adapter_model.safetensors").read_bytes()
            return {"loss": float("nan"), "accuracy": 0.5}
        return result
    monkeypatch.setattr(train_lora_basic, "evaluate", evaluate)
    code = train_lora_basic.main(run_args(tiny_assets, out))
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # the rest is tqdm's progress bar
    assert code == 1 and "Traceback" not in err and len(errors) == 1
    assert "eval loss became nan" in errors[0] and "last good adapter" in errors[0]
    assert (out / "adapter_model.safetensors").read_bytes() == seen["good"]
    assert not (out / "training_metrics.json").exists()
    monkeypatch.undo()
    # the epoch-1 checkpoint is intact: the run can go on from there
    assert run_folder.newest_checkpoint(str(out)) == str(out / "checkpoint")


def test_inference_refuses_an_adapter_with_nan_weights(tiny_runs, tmp_path, capsys):
    import inference_example
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "nan"
    shutil.copytree(tiny_runs["bert"], folder, ignore=shutil.ignore_patterns("final", "logs"))
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, folder / "adapter_model.safetensors")
    code = inference_example.main(["--adapter_dir", str(folder), "--mode", "demo", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "non-finite" in err


def test_ctrl_c_says_at_once_that_the_run_will_stop_after_its_step(capfd):
    import signal as signals
    import run_folder
    run_folder.catch_ctrl_c(False)  # no stop requested yet
    run_folder.request_stop()  # a callback's request: nothing to tell
    assert run_folder.stop_requested() and capfd.readouterr().err == ""
    run_folder.catch_ctrl_c(False)
    run_folder.request_stop(signals.SIGINT, None)  # as the signal module calls the handler
    err = capfd.readouterr().err
    assert run_folder.stop_requested() and "Ctrl-C: stopping after the current step or evaluation" in err
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
        run_folder.request_stop(signals.SIGINT, None)
    run_folder.catch_ctrl_c(False)
