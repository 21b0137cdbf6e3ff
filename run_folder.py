"""The output folder of a run: nothing in it is ever lost, whatever stops the run.

- claim_output_dir: one live run per folder (a lock with its pid), no finished run overwritten by accident,
  and --overwrite_output_dir that moves the previous run aside and deletes it only once the new run has a result.
- Checkpoints: written completely into checkpoint.new/ (a marker file last), then swapped in by renames. A kill
  at any instruction leaves a state from which newest_checkpoint finds the newest complete checkpoint.
- The log file, TensorBoard scalars and the history (RunRecord), the loss sums kept on the device (StepSums),
  Ctrl-C (request_stop), the best adapter, the ./output link to the latest finished run, and the "already done"
  check of a sweep.

train_lora_basic.py calls these; the loop itself stays there, where a learner reads it.
"""

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable, Optional, Union

import torch

from config import LATEST_RUN_LINK, RESULTS_ROOT, ConfigError
from lora_linear import AdapterError, load_adapter, save_adapter, write_atomically
from report import write_json_atomic
from sources import dataset_falls_back, model_reachable

log = logging.getLogger("train_lora")


# ----------------------------------------------------------------------------- claiming the folder

def claim_output_dir(output_dir: str, resume: bool, overwrite: bool) -> str:
    """Refuse to clobber: a live run holding the lock, or a finished run unless asked to overwrite. Returns the
    path of the lock file, which the caller removes when the run ends.

    --resume settles the checkpoint folders (the newest complete one becomes checkpoint/); a fresh start
    never deletes a complete checkpoint unless --overwrite_output_dir. That moves the previous run aside
    (.overwrite-previous/) and deletes it only when the new run writes its first result; a new run that
    fails or is killed before that gets the previous run put back. Old and new files are never mixed.
    """
    try:
        lock = _take_lock(output_dir)
    except OSError as e:  # a file, a path through a file, no permission, read-only disk
        raise ConfigError(f"output_dir '{output_dir}' cannot be written ({e.strerror or type(e).__name__}); "
                          f"choose a writable folder") from None
    try:
        restore_previous_run(output_dir)  # an overwrite whose new run produced nothing: the old run comes back
        has_checkpoint = newest_checkpoint(output_dir) is not None
        finished = os.path.isfile(os.path.join(output_dir, "training_metrics.json"))
        problem = None
        partial = [n for n in CHECKPOINT_NAMES if os.path.isdir(os.path.join(output_dir, n))]
        if resume and not has_checkpoint and partial:
            problem = (f"--resume but no checkpoint in '{output_dir}' is complete ({', '.join(partial)}: a file is "
                       f"missing, truncated or changed since it was written); start again with --overwrite_output_dir")
        elif resume and not has_checkpoint:
            problem = f"--resume but '{output_dir}' has no checkpoint/; start without --resume"
        elif not resume and not overwrite and has_checkpoint:
            problem = f"'{output_dir}' holds an interrupted run; continue it with --resume or pass --overwrite_output_dir"
        elif not resume and not overwrite and finished:
            problem = f"'{output_dir}' already holds a finished run; pass --overwrite_output_dir or another --output_dir"
        if problem:
            raise ConfigError(problem)
        if not resume and overwrite:
            _set_previous_run_aside(output_dir)
        settle_checkpoints(output_dir)  # resume: the newest complete one; else only incomplete leftovers: removed
    except OSError as e:
        os.remove(lock)
        raise ConfigError(f"output_dir '{output_dir}' cannot be prepared ({e.strerror or type(e).__name__}: "
                          f"{getattr(e, 'filename', '') or ''}); check its permissions") from None
    except ConfigError:
        os.remove(lock)
        raise
    return lock


def _take_lock(output_dir):
    os.makedirs(output_dir, exist_ok=True)
    lock = os.path.join(output_dir, ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            with open(lock) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):  # unreadable or garbage: not a live run's lock
            pid = 0
        if _process_alive(pid):
            raise ConfigError(f"output_dir '{output_dir}' is in use by a running training (pid {pid}); "
                              f"choose another --output_dir")
        os.remove(lock)  # left by a run that died
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return lock


# What a run writes into output_dir; --overwrite_output_dir moves exactly these aside (never a user's other files).
RUN_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "final", "checkpoint",
               "checkpoint.new", "checkpoint.old", "training_metrics.json", "training_curves.png",
               "training_log.txt", "model_comparison.txt", "logs")
PREVIOUS_RUN = ".overwrite-previous"  # hidden: compare_ranks does not read it as a run
OVERWRITE_MOVING = ".overwrite-moving"


def _run_outputs(output_dir):
    names = []
    for name in sorted(os.listdir(output_dir)):
        if name in RUN_OUTPUTS or name.endswith((".tmp", ".tmp.png")):
            names.append(name)
        elif name == "README.md":  # the model card push_to_hub writes; a user's own README stays
            try:
                with open(os.path.join(output_dir, name), encoding="utf-8") as f:
                    if f.read(64).startswith("---\nlibrary_name: peft"):
                        names.append(name)
            except (OSError, UnicodeDecodeError):
                pass
    return names


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _set_previous_run_aside(output_dir):
    """--overwrite_output_dir: move the previous run's files into .overwrite-moving/, one rename each, then rename
    that to .overwrite-previous/: from then on every run output outside it belongs to the new run."""
    moving = os.path.join(output_dir, OVERWRITE_MOVING)
    os.makedirs(moving, exist_ok=True)
    for name in _run_outputs(output_dir):
        os.replace(os.path.join(output_dir, name), os.path.join(moving, name))
    os.replace(moving, os.path.join(output_dir, PREVIOUS_RUN))


def commit_overwrite(output_dir: str) -> None:
    """The new run is about to write a result: the previous run it replaces is deleted (renamed away first)."""
    previous = os.path.join(output_dir, PREVIOUS_RUN)
    if os.path.isdir(previous):
        _discard(previous)


def restore_previous_run(output_dir: str) -> bool:
    """Undo an overwrite whose new run wrote no result (it failed or was killed early): its files (logs only)
    go, the previous run's come back. Each step is idempotent, so a kill here is finished by the next call.
    Killed while still moving aside (.overwrite-moving/), the new run never started: every file is old.
    True if there was a previous run to put back."""
    for name, new_run_started in ((OVERWRITE_MOVING, False), (PREVIOUS_RUN, True)):
        folder = os.path.join(output_dir, name)
        if not os.path.isdir(folder):
            continue
        saved = os.listdir(folder)
        if new_run_started:
            for other in _run_outputs(output_dir):
                if other not in saved:
                    _remove(os.path.join(output_dir, other))
        for item in saved:
            _remove(os.path.join(output_dir, item))
            os.replace(os.path.join(folder, item), os.path.join(output_dir, item))
        os.rmdir(folder)
        return True
    return False


def _process_alive(pid):
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def setup_logging(output_dir: str, is_main: bool) -> None:
    """The "train_lora" log: to the console, and on the main process to output_dir/training_log.txt (appended,
    so a resumed run continues it); other ranks log warnings only."""
    log.handlers.clear()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if is_main:
        # delay: a run refused before its first log line leaves no empty log behind
        handlers.append(logging.FileHandler(os.path.join(output_dir, "training_log.txt"), mode="a", delay=True))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)


def point_latest_run(output_dir: str) -> None:
    """Make ./output point at this run when it lives in results/ (the course's `ls -lh output/`)."""
    if os.path.commonpath([os.path.abspath(output_dir), os.path.abspath(RESULTS_ROOT)]) != os.path.abspath(RESULTS_ROOT):
        return
    if os.path.lexists(LATEST_RUN_LINK) and not os.path.islink(LATEST_RUN_LINK):
        log.info(f"'{LATEST_RUN_LINK}' is a folder of its own, so it is left alone; this run is in {output_dir}")
        return
    staging = LATEST_RUN_LINK + ".new-link"
    try:
        if os.path.lexists(staging):
            os.remove(staging)
        os.symlink(os.path.relpath(output_dir), staging)
        os.replace(staging, LATEST_RUN_LINK)  # atomic: the link always points at a finished run
        log.info(f"'{LATEST_RUN_LINK}' now points at {output_dir}")
    except OSError as e:  # e.g. no symlinks on this file system: the run itself is complete
        log.info(f"could not point '{LATEST_RUN_LINK}' at {output_dir} ({e})")


# ----------------------------------------------------------------------------- Ctrl-C, divergence

_STOP_REQUESTED = False  # set by Ctrl-C (or a callback); the loop checks it after every optimizer step


class TrainingDiverged(RuntimeError):
    """The loss or an evaluation became nan or inf: reported in one line, exit status 1."""


def request_stop(*signal_args: Any) -> None:
    """SIGINT handler: the loop finishes its optimizer step, saves a checkpoint and exits 130."""
    global _STOP_REQUESTED
    if _STOP_REQUESTED:  # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    _STOP_REQUESTED = True
    if signal_args:  # Ctrl-C, not a callback: say so at once (a big evaluation or step can take minutes)
        # os.write, not print: the handler may run while the progress bar is in the middle of a print
        try:
            os.write(2, b"\nCtrl-C: stopping after the current step or evaluation, with a checkpoint "
                        b"(Ctrl-C again: stop at once, without one)\n")
        except OSError:  # no stderr (closed): the stop itself must still happen
            pass


def stop_requested() -> bool:
    """True once Ctrl-C (or request_stop) asked the run to stop after its current optimizer step."""
    return _STOP_REQUESTED


def catch_ctrl_c(enabled: bool) -> Union[Callable[..., Any], int, None]:
    """Route Ctrl-C to request_stop for this run; returns the handler to put back (None if not enabled)."""
    global _STOP_REQUESTED
    _STOP_REQUESTED = False
    return signal.signal(signal.SIGINT, request_stop) if enabled else None


# ----------------------------------------------------------------------------- what a run records

class StepSums:
    """Loss and correct counts summed on the device and read on the host once per log line, evaluation or
    checkpoint: reading them every step would make a GPU wait idle while Python prepares the next step."""

    def __init__(self, device: torch.device, state: dict) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x items, correct
        self.items = 0
        parked = state.pop("pending", None)
        if parked:  # sums an interrupted run had not flushed: added up in the uninterrupted order
            self.sums[:] = torch.tensor(parked[:2], dtype=torch.float64)
            self.items = parked[2]
        self.state = state

    def add(self, loss: torch.Tensor, items: int, correct: Optional[torch.Tensor] = None) -> None:
        """Add one micro-batch's mean loss (times its items) and correct count, on the device: no host sync."""
        self.sums[0] += loss.detach().double() * items
        if correct is not None:
            self.sums[1] += correct
        self.items += items

    def flush(self) -> None:
        """Move the sums into the log window and the epoch's sums; a nan loss stops the run here, before any
        evaluation or save can see the diverged weights."""
        if not self.items:
            return
        loss_sum, correct = self._read()
        for sums in (self.state["window"], self.state["epoch_sums"]):
            sums[0], sums[1], sums[2] = sums[0] + loss_sum, sums[1] + correct, sums[2] + self.items
        self.sums.zero_()
        self.items = 0

    def park(self) -> None:
        """Keep unflushed sums in the state as they are (for the checkpoint): flushing them now would add them
        up in another order than an uninterrupted run does, and its logged losses would differ in the last bit."""
        self.state["pending"] = self._read() + [self.items]

    def _read(self) -> list:
        """The sums on the host (the one sync); a nan or inf loss is a diverged run."""
        loss_sum, correct = self.sums.tolist()
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"loss became {loss_sum} by step {self.state['step']}")
        return [loss_sum, correct]


class RunRecord:
    """Each logged window and evaluation goes three ways: the state's history (metrics json, curves,
    checkpoint), the log (console and training_log.txt) and TensorBoard (logs/<run name>)."""

    def __init__(self, state: dict, logging_dir: Optional[str], purge_step: Optional[int]) -> None:
        self.state, self.writer = state, None
        if logging_dir:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: events a killed run logged after its checkpoint are dropped, not shown twice
            self.writer = SummaryWriter(logging_dir, purge_step=purge_step)

    def _scalars(self, prefix: str, values: dict) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, self.state["step"])

    def train_window(self, total_steps: int, lr: float, with_accuracy: bool) -> dict:
        """The mean loss (and accuracy) since the last log line."""
        state, window = self.state, self.state["window"]
        entry = {"step": state["step"], "epoch": state["epoch"] + 1, "loss": window[0] / window[2], "lr": lr}
        if with_accuracy:
            entry["accuracy"] = window[1] / window[2]
        state["history"]["train"].append(entry)
        log.info(f"step {state['step']}/{total_steps} " + " ".join(f"{k} {v:.4g}" for k, v in entry.items()
                                                                   if k != "step"))
        self._scalars("train", {k: v for k, v in entry.items() if k in ("loss", "accuracy", "lr")})
        window[:] = [0.0, 0.0, 0]
        return entry

    def evaluation(self, result: dict, metric: str, baseline: bool) -> None:
        """An evaluation into the history, the log and TensorBoard; baseline: the one at step 0, before training."""
        state = self.state
        state["history"]["eval"].append({"step": state["step"], "epoch": state["epoch"] + 1, **result})
        log.info(f"eval step {state['step']}{' (before training)' if baseline else ''}: loss {result['loss']:.4f}, "
                 f"{metric} {result[metric]:.4f}")
        self._scalars("eval", result)

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer:
            self.writer.close()


def new_state() -> dict:
    """What a run carries from step to step, and what a checkpoint saves."""
    return {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epoch_sums": [0.0, 0.0, 0.0], "window": [0.0, 0.0, 0],
            "history": {"train": [], "eval": []}, "epochs": [], "best": None, "train_time_s": 0.0,
            "eval_time_s": 0.0}


def keep_if_best(output_dir: Optional[str], model: torch.nn.Module, state: dict, result: dict, metric: str,
                 base_name: str) -> None:
    """A new best evaluation (higher accuracy, lower perplexity) becomes state["best"], and its adapter replaces
    the one at the top of output_dir (None: nothing is written)."""
    value, best = result[metric], state["best"]
    better = best is None or (value > best["value"] if metric == "accuracy" else value < best["value"])
    if not better:
        return
    state["best"] = {"metric_name": metric, "value": value, "step": state["step"], "epoch": state["epoch"] + 1}
    if output_dir is not None:
        commit_overwrite(output_dir)
        save_adapter(model, output_dir, base_model_name_or_path=base_name)
        log.info(f"new best eval {metric} {value:.4f}: adapter saved to {output_dir}")


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_NAMES = ("checkpoint", "checkpoint.new", "checkpoint.old")  # every state the swap can leave
CHECKPOINT_MARKER = "checkpoint_complete.json"  # written last: a folder without it is incomplete
TRASH_PREFIX = ".trash-"  # a folder is renamed to this before it is deleted: half-deleted is never a candidate


def _checkpoint_step(folder):
    """(step, written) of a complete checkpoint folder, None if it is incomplete."""
    marker = os.path.join(folder, CHECKPOINT_MARKER)
    try:
        if os.path.isfile(marker):
            with open(marker) as f:
                info = json.load(f)
            if all(os.path.getsize(os.path.join(folder, name)) == size for name, size in info["files"].items()):
                return int(info["step"]), int(info["written"])
            return None
        # written by an earlier version of this script, without the marker: complete if its three files are
        if all(os.path.isfile(os.path.join(folder, n)) for n in ("adapter_config.json", "adapter_model.safetensors",
                                                                   "trainer_state.pt")):
            saved = torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=True)
            return int(saved["state"]["step"]), 0
    except Exception:  # unreadable marker or state: incomplete
        return None
    return None


def checkpoint_precision(output_dir: str) -> Optional[tuple]:
    """(precision, base_dtype) the newest checkpoint was trained in, None if unknown: a resumed run continues
    in the precision it started in instead of measuring again."""
    folder = newest_checkpoint(output_dir)
    try:
        with open(os.path.join(folder, CHECKPOINT_MARKER)) as f:
            info = json.load(f)
        return (info["precision"], info["base_dtype"]) if info.get("precision") else None
    except (TypeError, OSError, ValueError, KeyError):
        return None


def newest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint folder among checkpoint/, checkpoint.new/ and checkpoint.old/, or None."""
    found = []
    for rank, name in enumerate(CHECKPOINT_NAMES):
        folder = os.path.join(output_dir, name)
        step = _checkpoint_step(folder) if os.path.isdir(folder) else None
        if step is not None:
            found.append((step, -rank, folder))
    return max(found)[2] if found else None


def _discard(folder):
    """Rename, then delete: a kill during the deletion leaves only a trash folder, which nothing reads."""
    trash = os.path.join(os.path.dirname(folder), f"{TRASH_PREFIX}{os.path.basename(folder)}-{time.time_ns()}")
    os.replace(folder, trash)
    shutil.rmtree(trash)


def settle_checkpoints(output_dir: str) -> Optional[str]:
    """Leave one checkpoint folder, checkpoint/, holding the newest complete checkpoint (or none if no complete one
    exists). Every step is a rename or the deletion of a renamed folder, so a kill anywhere here leaves a state
    that this function settles again. Returns that folder or None."""
    for name in os.listdir(output_dir):
        if name.startswith(TRASH_PREFIX):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    best = newest_checkpoint(output_dir)
    final = os.path.join(output_dir, "checkpoint")
    for name in CHECKPOINT_NAMES:
        folder = os.path.join(output_dir, name)
        if folder != best and os.path.isdir(folder):
            _discard(folder)  # incomplete, or older than best
    if best is not None and best != final:
        os.replace(best, final)
    return final if best is not None else None


def save_checkpoint(output_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Optional[torch.amp.GradScaler],
                    state: dict, config: dict, provenance: dict) -> None:
    """Write checkpoint.new/ completely (its marker last), then swap it in. A kill at any instruction leaves
    either the previous complete checkpoint or this one findable by newest_checkpoint; nothing is overwritten
    in place and a folder is deleted only after it has been renamed away."""
    commit_overwrite(output_dir)
    final = os.path.join(output_dir, "checkpoint")
    staging, old = final + ".new", final + ".old"
    if os.path.isdir(staging):
        _discard(staging)  # half written by a run that was killed: never mix its files with this one's
    save_adapter(model, staging, base_model_name_or_path=provenance["model"]["used"])
    trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "state": state,
                     "config": json.dumps(config), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    write_atomically(os.path.join(staging, "trainer_state.pt"), lambda tmp: torch.save(trainer_state, tmp))
    files = {n: os.path.getsize(os.path.join(staging, n)) for n in sorted(os.listdir(staging))}
    write_json_atomic(os.path.join(staging, CHECKPOINT_MARKER),
                      {"step": state["step"], "written": time.time_ns(), "files": files,
                       "precision": state.get("precision"), "base_dtype": config["training"]["base_dtype"]})
    if os.path.isdir(old):
        _discard(old)  # left by a kill after an earlier swap; older than final
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(staging, final)
    if os.path.isdir(old):
        _discard(old)


TRAINER_STATE_KEYS = ("optimizer", "scheduler", "scaler", "state", "config", "torch_rng", "cuda_rng")


def load_checkpoint(output_dir: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: Optional[torch.amp.GradScaler],
                    config: dict) -> dict:
    """--resume: the newest complete checkpoint into the model (LoRA and head), optimizer, schedule, scaler and
    random state; returns the run's state. A checkpoint of another config, or an unreadable one, is a ConfigError."""
    folder = newest_checkpoint(output_dir)  # checkpoint/ once claim_output_dir has settled the folders
    if folder is None:
        raise ConfigError(f"--resume but '{output_dir}' has no complete checkpoint/; start without --resume")
    path = os.path.join(folder, "trainer_state.pt")
    fix = "delete it (or pass --overwrite_output_dir without --resume) to start again"
    try:
        load_adapter(model, folder)  # strict: the LoRA weights and head of the checkpoint
    except AdapterError as e:
        raise ConfigError(f"the checkpoint in {folder} does not fit this model ({e}); {fix}") from None
    try:
        # weights_only: tensors, numbers and containers only; nothing is unpickled as code
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict) or not all(k in saved for k in TRAINER_STATE_KEYS):
            raise ValueError("not a trainer state of this script")
        old_config = json.loads(saved["config"])
        changed = [k for k in ("lora", "training", "data", "task", "model_name")
                   if json.dumps(old_config[k], sort_keys=True) != json.dumps(config[k], sort_keys=True)]
    except Exception as e:  # truncated, another program's file, a pickle asking for code
        raise ConfigError(f"{path} is corrupt or was not written by this script ({type(e).__name__}); {fix}") from None
    if changed:
        raise ConfigError(f"--resume with a different config ({', '.join(changed)} changed); "
                          f"resume with the original settings")
    try:
        state = saved["state"]
        if not all(k in state for k in ("step", "epoch", "batch_in_epoch", "epoch_sums", "history", "best")):
            raise ValueError("the training state lacks fields")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
    except Exception as e:
        raise ConfigError(f"{path} does not match this run ({type(e).__name__}: {str(e)[:120]}); {fix}") from None
    return state


def already_done(config: dict, args: argparse.Namespace) -> Optional[str]:
    """A sweep that reaches a configuration it already finished (its folder is named by the configuration):
    the run's result, else None. The course's loops without --output can then be run again without an error;
    a folder the user named is never taken as done (its settings may differ): claim_output_dir refuses it."""
    metrics_path = os.path.join(config["output_dir"], "training_metrics.json")
    if args.resume or args.overwrite_output_dir or not config.get("track", {}).get("named_by_configuration") \
            or not os.path.isfile(metrics_path) or newest_checkpoint(config["output_dir"]):
        return None
    try:
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        best = metrics["best"]
        provenance = metrics["provenance"]
        if provenance["model"].get("fallback") and model_reachable(config["model_name"]) \
                or provenance.get("data", {}).get("fallback") and not dataset_falls_back(config):
            return None  # trained on an offline fallback, and the real model or data can be had now: not the same run
        return f"{best['metric_name']} {float(best['value']):.4f}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable: claim_output_dir explains what to do
