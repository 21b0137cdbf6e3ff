"""
Fine-tune a transformer with hand-written LoRA.

    python train_lora_basic.py --config config.yaml                      # BERT x SST-2 (classification)
    python train_lora_basic.py --model gpt2                              # GPT-2 x wikitext-2 (the model picks the track)
    python train_lora_basic.py --config configs/gpt2_cpu.yaml            # the same, sized for a CPU
    python train_lora_basic.py --rank 16 --learning_rate 5e-4 --output_dir results/rank_16
    torchrun --nproc_per_node 2 train_lora_basic.py --config config.yaml # DistributedDataParallel

Every config key is also a flag (--rank, --batch_size, ...). Read it top to bottom:

    main()        config (config.py) -> train() -> optional upload
    train()       claim the output folder (run_folder.py), build the run, run the loop, write the results
    build_run()   model and data (sources.py, data.py), LoRA (lora_linear.py), optimizer and schedule
    train_loop()  the loop, written out by hand on purpose: evaluate at step 0, then forward, loss, backward,
                  clip, step, log, evaluate, checkpoint; Ctrl-C saves a checkpoint that --resume continues
"""

import argparse
import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from config import ConfigError, build_arg_parser, load_config
from data import build_datasets, check_max_length, make_loader
from families import TRACKS
from lean_layers import use_lean_layers
from losses import ChunkedCausalLM
from lora_linear import apply_lora_to_model, count_lora_parameters, mark_only_lora_as_trainable, save_adapter
from precision import (autocast_context, cast_frozen_weights, choose_precision, keep_freed_memory_for_reuse,
                       pick_device, seconds_per_training_step, set_seed, trainable_to_fp32)
from report import (describe_lora_layers, format_parameter_table, machine_description, wall_time_and_peak,
                    write_run_report)
from run_folder import (RunRecord, StepSums, TrainingDiverged, already_done, catch_ctrl_c, checkpoint_precision,
                        claim_output_dir,
                        commit_overwrite, keep_if_best, load_checkpoint, new_state, point_latest_run, request_stop,
                        restore_previous_run, save_checkpoint, setup_logging, stop_requested)
from sources import check_local_head, load_base_model, load_splits

log = logging.getLogger("train_lora")
__all__ = ["main", "train", "build_run", "train_loop", "evaluate", "request_stop", "TrainingDiverged"]


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Dict[str, torch.Tensor]], task: str, device: torch.device,
             precision: str, world_size: int, show_progress: bool) -> dict:
    """Mean loss and accuracy (classification) or perplexity (causal LM), summed across ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss * items, correct, items
    for batch in tqdm(loader, desc="eval", leave=False, disable=not show_progress):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_context(precision, device):
            out = model(**batch)
        if task == "classification":
            items = batch["labels"].numel()
            totals[1] += (out.logits.argmax(-1) == batch["labels"]).sum()
        else:
            items = batch["labels"][:, 1:].numel()  # predicted positions
        totals[0] += out.loss.double() * items
        totals[2] += items
    if world_size > 1:
        dist.all_reduce(totals)
    loss = (totals[0] / totals[2]).item()
    model.train()
    if task == "classification":
        return {"loss": loss, "accuracy": (totals[1] / totals[2]).item()}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}  # exp of a diverging loss would overflow


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """One training run: what build_run() makes and the loop reads and updates."""
    config: dict
    model: nn.Module              # the base model with its LoRA layers: evaluated, saved
    tokenizer: Any
    step_model: nn.Module         # what a training step calls: the model (with the chunked causal-LM loss, in DDP)
    eval_model: nn.Module         # the same without DDP
    train_loader: Any
    eval_loader: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    trainable: list               # the parameters that train (clipped together)
    total_steps: int
    precision: str
    precision_reason: str
    device: torch.device
    world_size: int
    saves: bool                   # rank 0 of a run with an output folder (an in-memory run writes nothing)
    provenance: dict
    counts: dict
    state: dict = field(default_factory=new_state)
    start: float = field(default_factory=time.time)
    earlier: tuple = (0.0, 0.0)   # a resumed run's earlier processes: wall seconds and peak MB (report.wall_time_and_peak)
    sums: Optional[StepSums] = None
    record: Optional[RunRecord] = None

    @property
    def task(self) -> str:
        """classification or causal_lm: what the run fine-tunes for."""
        return self.config["task"]

    @property
    def metric(self) -> str:
        """What evaluation reports and "best" means: accuracy or perplexity."""
        return TRACKS[self.task].metric


def setup_distributed(config: dict) -> tuple:
    """(rank, world_size, device). torchrun sets WORLD_SIZE; nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(config["device"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    picked = pick_device(config["device"])  # a device that is not there: the same error as in one process
    if picked.type == "cuda":
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    elif picked.type == "cpu":
        device, backend = picked, "gloo"
    else:
        raise ConfigError(f"several processes (torchrun) run on CUDA or the CPU, not {picked.type}; "
                          f"use --device cuda or --device cpu")
    dist.init_process_group(backend)
    return dist.get_rank(), world_size, device


def optimizer_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups over what trains: weight decay on weights (LoRA's A and B), never on biases."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in trainable if not n.endswith("bias")], "weight_decay": weight_decay},
            {"params": [p for n, p in trainable if n.endswith("bias")], "weight_decay": 0.0}]


def load_model(config: dict, base_dtype: str, prepare: Optional[Callable[[nn.Module], nn.Module]] = None) -> tuple:
    """(model, tokenizer, provenance): the base model (frozen weights stored in base_dtype) with LoRA on the
    configured targets, only LoRA (and the chosen biases) trainable. prepare(model) replaces the LoRA step."""
    lora = config["lora"]
    check_local_head(config)
    model, tokenizer, provenance = load_base_model(config["model_name"], config["task"], config["num_labels"],
                                                   config["fallback"]["offline_model"], base_dtype)
    check_max_length(model, config["training"]["max_length"])
    if prepare is not None:
        return trainable_to_fp32(prepare(model)), tokenizer, provenance
    try:  # null targets: the family's default; roles (q_proj, v_proj, ...) mean the same on every family
        apply_lora_to_model(model, lora["target_modules"], lora["rank"], lora["alpha"], lora["dropout"],
                            lora["init_B"], lora["scaling"])
    except ValueError as e:  # a target that matches nothing: the message lists the roles and the layer names
        raise ConfigError(f"{e} (model {provenance['used']})") from None
    # LoRA's A and B (and a trained head) stay fp32 even on a bf16 base: an update of 1e-4 added to a bf16
    # weight rounds away. Autocast joins the fp32 and half-precision parts in each matmul.
    return trainable_to_fp32(mark_only_lora_as_trainable(model, bias=lora["bias"])), tokenizer, provenance


def training_step_model(model: nn.Module, world_size: int, device: torch.device, compile_step: bool) -> nn.Module:
    """The model as the training step calls it: in DDP across processes, and compiled if asked, with fixed
    shapes (dynamic=False; the batches are padded to a few lengths) and on CUDA mode reduce-overhead, whose
    CUDA graphs replay a whole step's kernels at once instead of Python launching each. Evaluation keeps the
    eager model: its batches have other shapes."""
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if not compile_step:
        return model
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


def plan_precision(config: dict, device: torch.device, world_size: int, resume: bool) -> tuple:
    """(precision, why, measure, base_auto). auto on a device with a native half precision is measured once the
    model is built (measure); a resumed run continues in the precision it started in. Sets base_dtype auto
    for what is known now: bf16 in a bf16 run, else fp32."""
    training = config["training"]
    precision, reason = choose_precision(training["precision"], device)
    measure = training["precision"] == "auto" and precision != "fp32" and world_size == 1
    base_auto = training["base_dtype"] == "auto"
    resumed = checkpoint_precision(config["output_dir"]) if resume else None
    if resumed and training["precision"] == "auto":
        (precision, resumed_base), reason, measure = resumed, "auto: as when the run started", False
        training["base_dtype"] = resumed_base if base_auto else training["base_dtype"]
        base_auto = False
    if base_auto:  # bf16 runs keep the frozen weights in bf16 (LoRA and head stay fp32); fp16 keeps them in
        # fp32: a base pretrained in bf16 can overflow fp16's range in norms and residuals
        training["base_dtype"] = "bf16" if precision == "bf16" and not measure else "fp32"
    if training["base_dtype"] != "fp32" and precision != training["base_dtype"]:
        raise ConfigError(f"base_dtype: {training['base_dtype']} needs precision: {training['base_dtype']} (autocast "
                          f"joins the half-precision base with the fp32 LoRA weights and head); add "
                          f"--precision {training['base_dtype']}")
    return precision, reason, measure, base_auto


# The timed batch holds at most this many tokens (whole rows of the longest batch, at least one). The fp32 trial
# of a causal LM's full 8 x 512 batch held more memory than the whole bf16 run that followed. A shorter trial
# can rate bf16's lead lower (SmolLM2: smaller at 2 x 512 than at 8 x 512); where that makes a near tie, auto
# keeps fp32, the exact one, as HALF_PRECISION_MARGIN intends.
PRECISION_TRIAL_TOKENS = 1024


def measure_precision(model: nn.Module, step_model: nn.Module, train_set: list,
                      collate: Callable[[List[dict]], Dict[str, torch.Tensor]], config: dict,
                      device: torch.device, base_auto: bool) -> tuple:
    """(precision, why): the device's half precision where a training step on the job's longest batch (cut to
    PRECISION_TRIAL_TOKENS) takes at most precision.HALF_PRECISION_MARGIN of fp32's time, else fp32. With
    base_dtype auto, a bf16 choice then stores the frozen weights in bf16."""
    training = config["training"]
    longest = sorted(train_set, key=lambda e: len(e["input_ids"]))[-training["batch_size"]:]
    rows = max(1, PRECISION_TRIAL_TOKENS // len(longest[-1]["input_ids"]))
    batch = {k: v.to(device) for k, v in collate(longest[-rows:]).items()}
    precision, reason = choose_precision("auto", device,
                                         functools.partial(seconds_per_training_step, step_model, batch, device=device))
    if precision == "bf16" and base_auto:  # what base_dtype auto loads in a bf16 run
        cast_frozen_weights(model, torch.bfloat16)
        training["base_dtype"] = "bf16"
    return precision, reason


def build_run(config: dict, device: torch.device, rank: int = 0, world_size: int = 1, saves: bool = True,
              prepare: Optional[Callable[[nn.Module], nn.Module]] = None, resume: bool = False,
              purge_step: Optional[int] = None) -> Run:
    """Model, data, LoRA, precision, optimizer and schedule for `config`. prepare(model) replaces the LoRA step
    (the experiments train BitFit, full fine-tuning and PEFT's methods with this same loop); resume loads the
    folder's checkpoint; saves=False makes an in-memory run that writes nothing."""
    training = config["training"]
    precision, precision_reason, measure, base_auto = plan_precision(config, device, world_size, resume)
    set_seed(training["seed"])

    # Rank 0 fetches any offline asset first, the others then read it from the cache.
    if world_size > 1 and rank != 0:
        dist.barrier()
    splits = load_splits(config)  # data first: a wrong column fails before the model loads
    model, tokenizer, model_provenance = load_model(config, training["base_dtype"], prepare)
    train_set, eval_set, collate, data_provenance, label_map = build_datasets(config, tokenizer, splits)
    if world_size > 1 and rank == 0:
        dist.barrier()
    if label_map:  # so inference can print names; -1/1 data becomes 0/1
        model.config.id2label = dict(enumerate(data_provenance["label_names"]))
    if training["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    if device.type == "cpu":  # each step's activations reuse the last step's memory instead of faulting it in
        keep_freed_memory_for_reuse()
    # A causal LM's loss over a 49k-word vocabulary would hold (batch x length x vocab) fp32 logits: losses.py
    # computes it chunk by chunk instead, and lean_layers.py keeps less of each block for backward.
    # Classification heads are small: the model's own forward.
    eval_model = model
    if config["task"] == "causal_lm":
        use_lean_layers(model)
        eval_model = ChunkedCausalLM(model)
    if measure:  # half precision is not always faster (small GPU batches, some CPUs): time both
        precision, precision_reason = measure_precision(model, eval_model, train_set, collate, config, device,
                                                        base_auto)

    train_loader = make_loader(train_set, collate, training["batch_size"], True, training["group_by_length"],
                               training["seed"], rank, world_size, training["num_workers"])
    eval_loader = make_loader(eval_set, collate, training["eval_batch_size"], False, training["group_by_length"],
                              training["seed"], rank, world_size, training["num_workers"])
    optimizer = torch.optim.AdamW(optimizer_groups(model, training["weight_decay"]), lr=training["learning_rate"],
                                  fused=device.type == "cuda" or None)  # fused: one kernel for every tensor
    total_steps = math.ceil(len(train_loader) / training["gradient_accumulation_steps"]) * training["num_epochs"]
    if training["max_steps"]:
        total_steps = min(total_steps, training["max_steps"])
    from transformers import get_linear_schedule_with_warmup
    scheduler = get_linear_schedule_with_warmup(optimizer, int(training["warmup_ratio"] * total_steps), total_steps)
    run = Run(
        config=config, model=model, tokenizer=tokenizer, eval_model=eval_model,
        step_model=training_step_model(eval_model, world_size, device, training["compile"]),
        train_loader=train_loader, eval_loader=eval_loader, optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,  # fp16 gradients underflow
        trainable=[p for p in model.parameters() if p.requires_grad], total_steps=total_steps,
        precision=precision, precision_reason=precision_reason, device=device, world_size=world_size,
        saves=saves, provenance={"model": model_provenance, "data": data_provenance},
        counts=count_lora_parameters(model))
    if resume:
        run.state = load_checkpoint(config["output_dir"], model, optimizer, scheduler, run.scaler, config)
        run.state.setdefault("window", [0.0, 0.0, 0])
        log.info(f"resumed from step {run.state['step']} (epoch {run.state['epoch'] + 1}, "
                 f"batch {run.state['batch_in_epoch']})")
    run.state["precision"] = precision  # the checkpoint marker records it: a resumed run continues in it
    run.sums = StepSums(device, run.state)
    # purge_step: TensorBoard drops events a killed run logged after its checkpoint, not showing them twice
    run.record = RunRecord(run.state, config["logging_dir"] if saves else None,
                           run.state["step"] if resume else purge_step)
    return run


def log_setup(run: Run) -> None:
    """What this run is: device, precision, model, task, adapted layers, data, parameter counts."""
    config, provenance = run.config, run.provenance
    log.info(f"device: {run.device} ({machine_description(run.device)}), precision: {run.precision} "
             f"({run.precision_reason}), world size: {run.world_size}")
    for kind, p in provenance.items():  # the banner went to the console; the log keeps it too
        if p.get("fallback"):
            log.warning(f"OFFLINE FALLBACK ({kind}): requested {p['requested']}, used {p.get('used', p.get('dataset'))}; "
                        f"why: {p['reason']}")
    log.info(f"model: {provenance['model']['used']} [{provenance['model']['source']}]; task {run.task} "
             f"(decided by {config.get('track', {}).get('decided_by', 'the config')})")
    lora = config["lora"]
    log.info(f"LoRA r={lora['rank']} alpha={lora['alpha']:g} on {describe_lora_layers(run.model)}"
             + ("" if lora["target_modules"] else " (the family's default targets)"))
    data = provenance["data"]
    log.info(f"data: {data.get('dataset', data['source'])}: {len(run.train_loader.dataset)} train / "
             f"{len(run.eval_loader.dataset)} eval examples [{data['source']}]")
    log.info("parameters:\n" + format_parameter_table(run.counts))


# ----------------------------------------------------------------------------- the loop

def train_loop(run: Run, callbacks: Sequence[Callable[[dict], Any]] = ()) -> bool:
    """Train until the last epoch (or max_steps); True if Ctrl-C (or a callback's request_stop) interrupted it."""
    training, state = run.config["training"], run.state
    accumulation = training["gradient_accumulation_steps"]
    if state["step"] == 0 and not state["history"]["eval"]:
        # Step 0: B = 0, so the model is exactly the pretrained one. Its loss and metric are the baseline
        # that shows what LoRA changed (the curves start here); it is never saved as the best.
        evaluate_and_record(run, baseline=True)
    epoch_start = time.time()
    while state["epoch"] < training["num_epochs"] and state["step"] < run.total_steps:
        # the epoch's order comes from (seed, epoch): a resumed run skips the batches it already trained on
        run.train_loader.batch_sampler.set_epoch(state["epoch"], skip_batches=state["batch_in_epoch"])
        batches_in_epoch = len(run.train_loader) + state["batch_in_epoch"]
        bar = progress_bar(run)
        for batch in bar:
            batch = {k: v.to(run.device) for k, v in batch.items()}
            state["batch_in_epoch"] += 1
            last_micro = state["batch_in_epoch"] % accumulation == 0 or state["batch_in_epoch"] == batches_in_epoch
            # the epoch's last window may hold fewer micro-batches: the gradient averages over those it has
            window_start = (state["batch_in_epoch"] - 1) // accumulation * accumulation
            in_window = min(accumulation, batches_in_epoch - window_start)
            # forward, loss, backward: gradients add up over the window's micro-batches
            forward_backward(run, batch, last_micro, in_window)
            if not last_micro:
                continue
            # clip, step: one optimizer step per accumulated batch
            optimizer_step(run)
            state["step"] += 1
            # log: the mean loss since the last log line (read from the device only here)
            logging_steps = training["logging_steps"]  # 0: only the last step is logged
            if logging_steps and state["step"] % logging_steps == 0 or state["step"] == run.total_steps:
                run.sums.flush()
                entry = run.record.train_window(run.total_steps, run.scheduler.get_last_lr()[0],
                                                run.task == "classification")
                bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k in ("loss", "accuracy", "lr")})
            # evaluate: every eval_steps, if set (and at the end of each epoch, below)
            if training["eval_steps"] and state["step"] % training["eval_steps"] == 0:
                evaluate_and_record(run)
            # checkpoint: every save_steps, if set (and at the end of each epoch), so a kill loses at most those
            if run.saves and training["save_steps"] and state["step"] % training["save_steps"] == 0 \
                    and state["batch_in_epoch"] < batches_in_epoch and state["step"] < run.total_steps:
                state["train_time_s"] += time.time() - epoch_start
                checkpoint_mid_epoch(run)
                epoch_start = time.time()
            for callback in callbacks:
                callback(state)
            if stop_requested() or state["step"] >= run.total_steps:
                break
        if stop_requested():
            run.sums.park()  # the checkpoint keeps the unflushed sums as they are
            state["train_time_s"] += time.time() - epoch_start
            return True
        # end of the epoch: evaluate, keep the best adapter, checkpoint
        state["train_time_s"] += time.time() - epoch_start
        end_epoch(run)
        epoch_start = time.time()
    return False


def checkpoint(run: Run) -> None:
    """save_checkpoint, with the run's wall time and peak memory so far: a resumed run reports all its processes."""
    run.state["wall_time_s"], run.state["peak_memory_mb"] = wall_time_and_peak(run)
    save_checkpoint(run.config["output_dir"], run.model, run.optimizer, run.scheduler, run.scaler, run.state,
                    run.config, run.provenance)


def checkpoint_mid_epoch(run: Run) -> None:
    """A checkpoint inside an epoch: the unflushed loss sums go into it as they are (see StepSums.park), and the
    run goes on with them on the device."""
    run.sums.park()
    checkpoint(run)
    del run.state["pending"]  # only for a run resumed from this checkpoint


def progress_bar(run: Run) -> tqdm:
    """The epoch's bar over the training batches: it counts a resumed epoch's batches already done, ends at
    max_steps, and shows only in a run that saves (rank 0)."""
    state, training = run.state, run.config["training"]
    left_in_epoch = len(run.train_loader)
    left_by_max_steps = (run.total_steps - state["step"]) * training["gradient_accumulation_steps"]
    return tqdm(run.train_loader, desc=f"epoch {state['epoch'] + 1}/{training['num_epochs']}", leave=False,
                disable=not run.saves, initial=state["batch_in_epoch"],
                total=state["batch_in_epoch"] + min(left_in_epoch, left_by_max_steps))


def forward_backward(run: Run, batch: dict, last_micro: bool, in_window: int) -> None:
    """One micro-batch: forward under autocast, the loss (divided by the micro-batches of its accumulation
    window, so that the accumulated gradient is their mean), backward. Loss and correct counts add up on the
    device."""
    # DDP all-reduces gradients in backward; between accumulation steps that would be wasted traffic
    sync = run.step_model.no_sync() if run.world_size > 1 and not last_micro else nullcontext()
    with sync:
        with autocast_context(run.precision, run.device):
            out = run.step_model(**batch)
        loss = out.loss
        scaled = loss / in_window
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
    correct = (out.logits.argmax(-1) == batch["labels"]).sum() if run.task == "classification" else None
    run.sums.add(loss, batch["labels"].shape[0], correct)


def optimizer_step(run: Run) -> None:
    """Clip the gradient norm, step AdamW and the schedule, clear the gradients."""
    if run.scaler:  # fp16: gradients were scaled up against underflow; unscale before clipping
        run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(run.trainable, run.config["training"]["max_grad_norm"])
    stepped = True
    if run.scaler:
        scale = run.scaler.get_scale()  # a host sync, in fp16 runs only
        run.scaler.step(run.optimizer)  # skips the step if a gradient overflowed
        run.scaler.update()
        stepped = run.scaler.get_scale() >= scale  # an overflow halves the scale
    else:
        run.optimizer.step()
    if stepped:  # as in HF Trainer: a skipped optimizer step does not advance the schedule
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adding


def evaluate_and_record(run: Run, baseline: bool = False) -> dict:
    """Evaluate, record the result, and keep the adapter if it is the best so far (never the step-0 baseline)."""
    run.sums.flush()
    eval_start = time.time()
    result = evaluate(run.eval_model, run.eval_loader, run.task, run.device, run.precision, run.world_size,
                      run.saves)
    run.state["eval_time_s"] = run.state.get("eval_time_s", 0.0) + time.time() - eval_start
    if not all(math.isfinite(v) for v in result.values()):  # never the new best, never a checkpoint
        raise TrainingDiverged(f"eval loss became {result['loss']} at step {run.state['step']}")
    run.record.evaluation(result, run.metric, baseline)
    if not baseline:  # an in-memory run (no folder) still knows its best
        keep_if_best(run.config["output_dir"] if run.saves else None, run.model, run.state, result, run.metric,
                     run.provenance["model"]["used"])
    return result


def end_epoch(run: Run) -> None:
    """The epoch's evaluation and summary line, then a checkpoint (unless it was the last epoch: the final
    adapter follows)."""
    state, task = run.state, run.task
    evals = state["history"]["eval"]
    if evals and evals[-1]["step"] == state["step"]:  # eval_steps evaluated this very step: not twice
        run.sums.flush()
        result = {k: v for k, v in evals[-1].items() if k not in ("step", "epoch")}
    else:
        result = evaluate_and_record(run)  # flushes the step sums into the epoch's first
    sums = state["epoch_sums"]
    summary = {"epoch": state["epoch"] + 1, "step": state["step"], "train_loss": sums[0] / max(sums[2], 1),
               **({"train_accuracy": sums[1] / max(sums[2], 1)} if task == "classification" else {}),
               **{f"eval_{k}": v for k, v in result.items()},
               "time_s": round(state["train_time_s"] - sum(e["time_s"] for e in state["epochs"]), 2)}
    state["epochs"].append(summary)
    log.info(f"epoch {state['epoch'] + 1} done: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                             for k, v in summary.items() if k != "epoch"))
    state.update(epoch=state["epoch"] + 1, batch_in_epoch=0, epoch_sums=[0.0, 0.0, 0.0])
    if run.saves and state["epoch"] < run.config["training"]["num_epochs"] and state["step"] < run.total_steps:
        checkpoint(run)


# ----------------------------------------------------------------------------- the command

def train(config: dict, args: argparse.Namespace, callbacks: Sequence[Callable[[dict], Any]] = ()) -> int:
    """Claim the output folder, train, write the results. 0 when finished, 130 when interrupted."""
    done = already_done(config, args)
    if done:
        print(f"{config['output_dir']} already holds a finished run of this configuration (best {done}); nothing "
              f"to do. --overwrite_output_dir trains it again.")
        return 0
    rank, world_size, device = setup_distributed(config)
    output_dir = config["output_dir"]
    lock = claim_output_dir(output_dir, args.resume, args.overwrite_output_dir) if rank == 0 else None
    try:
        return _train(config, args, callbacks, rank, world_size, device)
    except BaseException:
        if lock:  # an --overwrite_output_dir run that fails before its first result leaves the previous run as it was
            for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
                log.removeHandler(handler)
                handler.close()
            restore_previous_run(output_dir)
        raise
    finally:
        if lock and os.path.exists(lock):
            os.remove(lock)
            if not os.listdir(output_dir):  # refused before writing anything: leave no empty run folder behind
                os.rmdir(output_dir)
        if world_size > 1:
            dist.destroy_process_group()


def _train(config: dict, args, callbacks, rank: int, world_size: int, device: torch.device) -> int:
    output_dir, is_main = config["output_dir"], rank == 0
    setup_logging(output_dir, is_main)
    start = time.time()
    run = build_run(config, device, rank, world_size, saves=is_main, resume=args.resume,
                    purge_step=0 if args.overwrite_output_dir else None)
    run.start = start
    run.earlier = (run.state.get("wall_time_s", 0.0), run.state.get("peak_memory_mb", 0.0))  # 0 if not resumed
    log_setup(run)
    previous_handler = catch_ctrl_c(is_main and world_size == 1)
    try:
        interrupted = train_loop(run, callbacks)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e}. Training stopped; the last good adapter (if any eval ran) is kept in "
                               f"{output_dir}. Lower learning_rate or max_grad_norm, or use precision: fp32") from None
    finally:
        run.record.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    if interrupted:
        if is_main:
            checkpoint(run)
            log.info(f"interrupted at step {run.state['step']}: checkpoint saved to {output_dir}/checkpoint; "
                     f"continue with the same command plus --resume")
        return 130
    if is_main:
        finish(run)
    return 0


def finish(run: Run) -> None:
    """The final adapter, curves, metrics and comparison; ./output points here; the checkpoint goes."""
    output_dir, state = run.config["output_dir"], run.state
    commit_overwrite(output_dir)
    save_adapter(run.model, os.path.join(output_dir, "final"), base_model_name_or_path=run.provenance["model"]["used"])
    metrics = write_run_report(run)
    point_latest_run(output_dir)
    if os.path.isdir(os.path.join(output_dir, "checkpoint")):
        shutil.rmtree(os.path.join(output_dir, "checkpoint"))  # finished: the adapters above are the result
    metric = state["best"]["metric_name"]
    log.info(f"eval {metric} before training {metrics['initial_eval'][metric]:.4f} -> best "
             f"{state['best']['value']:.4f} (epoch {state['best']['epoch']}); training time "
             f"{state['train_time_s']:.1f} s, evaluation {metrics['eval_time_s']:.1f} s; peak memory "
             f"{metrics['peak_memory_mb']:.0f} MB")
    log.info(f"outputs in {output_dir}: adapter_config.json, adapter_model.safetensors, final/, "
             f"training_curves.png, training_metrics.json, training_log.txt, model_comparison.txt")


# ----------------------------------------------------------------------------- sharing

def push_to_hub(output_dir: str, hub_model_id: str, private: bool, metrics_path: str) -> str:
    """Upload the adapter folder with a generated model card; returns the repo's URL."""
    with open(metrics_path) as f:
        metrics = json.load(f)
    card = os.path.join(output_dir, "README.md")
    config = metrics["config"]
    with open(card, "w") as f:
        f.write(f"---\nlibrary_name: peft\nbase_model: {metrics['provenance']['model']['used']}\ntags: [lora]\n---\n\n"
                f"# {hub_model_id}\n\nA LoRA adapter (r={config['lora']['rank']}, alpha={config['lora']['alpha']}, "
                f"targets {config['lora']['target_modules']}) trained with train_lora_basic.py.\n\n"
                f"- base model: {metrics['provenance']['model']['used']} ({metrics['provenance']['model']['source']})\n"
                f"- data: {metrics['provenance']['data'].get('dataset', '')} ({metrics['provenance']['data']['source']})\n"
                f"- best eval {metrics['best']['metric_name']}: {metrics['best']['value']:.4f}\n"
                f"- trainable parameters: {metrics['parameters']['trainable']:,}\n\n"
                "Load it with PEFT: `PeftModel.from_pretrained(base_model, \"" + hub_model_id + "\")`.\n")
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(hub_model_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=output_dir, repo_id=hub_model_id,
                      allow_patterns=["adapter_config.json", "adapter_model.safetensors", "README.md",
                                      "training_metrics.json", "training_curves.png"])
    return f"https://huggingface.co/{hub_model_id}"


def main(argv: Optional[List[str]] = None, callbacks: Sequence[Callable[[dict], Any]] = ()) -> int:
    """The command: the config from the flags (and YAML), train, optionally push to the Hub. Exit status 0,
    1 (training diverged or the upload failed), 2 (a bad config) or 130 (Ctrl-C: a checkpoint was saved)."""
    parser = build_arg_parser(__doc__.strip().splitlines()[0])
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
        if args.push_to_hub and not args.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id user/name")
        code = train(config, args, callbacks)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if code == 0 and args.push_to_hub and int(os.environ.get("RANK", "0")) == 0:
        try:
            url = push_to_hub(config["output_dir"], args.hub_model_id, args.hub_private,
                              os.path.join(config["output_dir"], "training_metrics.json"))
            print(f"pushed to {url}")
        except Exception as e:  # no network, no token, no permission: results are already saved
            print(f"error: push to the Hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  f"the results are saved in {config['output_dir']}. Check network and `hf auth login`, then "
                  f"upload that folder.", file=sys.stderr)
            return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
