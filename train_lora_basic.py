"""
Fine-tune a transformer with hand-written LoRA.

    python train_lora_basic.py --config config.yaml                      # BERT x SST-2 (classification)
    python train_lora_basic.py --model gpt2                              # GPT-2 x wikitext-2 (the model picks the track)
    python train_lora_basic.py --config configs/gpt2_cpu.yaml            # the same, sized for a CPU
    python train_lora_basic.py --rank 16 --learning_rate 5e-4 --output_dir results/rank_16
    torchrun --nproc_per_node 2 train_lora_basic.py --config config.yaml # DistributedDataParallel

Every config key is also a flag (--rank, --batch_size, ...). The loop below is written out by hand on
purpose: AdamW over the LoRA parameters only, linear warmup then decay, gradient accumulation and clipping,
mixed precision, evaluation each epoch, the best adapter kept, and checkpoints that survive Ctrl-C.
"""

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from data import build_datasets, check_max_length, make_loader
from sources import load_splits
from families import TRACKS
from losses import ChunkedCausalLM
from lora_linear import (ROLES, apply_lora_to_model, count_lora_parameters, lora_layers, mark_only_lora_as_trainable,
                         save_adapter)
from run_folder import (already_done, claim_output_dir, commit_overwrite, load_checkpoint, point_latest_run,
                        restore_previous_run, save_checkpoint, setup_logging)
from config import ConfigError, build_arg_parser, load_config
from precision import autocast_context, pick_device, resolve_precision, set_seed, trainable_to_fp32
from report import format_parameter_table, library_versions, machine_description, peak_memory_mb, plot_training_curves, write_json_atomic, write_text_atomic
from sources import load_base_model

log = logging.getLogger("train_lora")
STOP_REQUESTED = False  # set by Ctrl-C (or a callback); checked after every optimizer step


class TrainingDiverged(RuntimeError):
    pass


def request_stop(*_):
    global STOP_REQUESTED
    if STOP_REQUESTED:  # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    STOP_REQUESTED = True


# ----------------------------------------------------------------------------- setup

def setup_distributed(config):
    """(rank, world_size, device). torchrun sets WORLD_SIZE; nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, pick_device(config["device"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and config["device"] in ("auto", "cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend)
    return dist.get_rank(), world_size, device


def describe_lora_layers(model, compact=False):
    """What was adapted, e.g. 'c_attn (q, v slices) x 12' for the log, or 'c_attn[q,v]' (compact) for tables."""
    kinds = Counter()
    for name, layer in lora_layers(model):
        parts = layer.lora.parts
        roles = [role[0] for role, on in zip(ROLES, parts or ()) if on]
        slices = (f"[{','.join(roles)}]" if compact else f" ({', '.join(roles)} slices)") if parts else ""
        kinds[name.rsplit(".", 1)[-1] + slices] += 1
    if compact:
        return ",".join(kinds)
    return ", ".join(f"{kind} x {count}" for kind, count in kinds.items())


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, task, device, precision, world_size, show_progress):
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
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


# ----------------------------------------------------------------------------- checks before training

def _check_local_head(config):
    """A local sequence-classification checkpoint whose head has another number of labels than num_labels: one line
    here instead of transformers' size-mismatch traceback."""
    path = os.path.join(config["model_name"], "config.json")
    if config["task"] != "classification" or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        has_head = any(str(a).endswith("ForSequenceClassification") for a in saved.get("architectures") or [])
        # transformers writes id2label only when it differs from its default of two labels
        labels = len(saved["id2label"]) if isinstance(saved.get("id2label"), dict) else saved.get("num_labels", 2)
    except (OSError, ValueError, AttributeError, TypeError):
        return  # unreadable: transformers reports it
    if has_head and isinstance(labels, int) and labels != config["num_labels"]:
        raise ConfigError(f"model '{config['model_name']}' has a {labels}-label classification head but num_labels "
                          f"is {config['num_labels']}; set num_labels: {labels} or start from a model without a head")


# ----------------------------------------------------------------------------- training

def train(config, args, callbacks=()):
    done = already_done(config, args)
    if done:
        print(f"{config['output_dir']} already holds a finished run of this configuration (best {done}); nothing "
              f"to do. --overwrite_output_dir trains it again.")
        return 0
    rank, world_size, device = setup_distributed(config)
    is_main = rank == 0
    output_dir = config["output_dir"]
    lock = claim_output_dir(output_dir, args.resume, args.overwrite_output_dir) if is_main else None
    try:
        return _train(config, args, callbacks, rank, world_size, device, is_main)
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


def _train(config, args, callbacks, rank, world_size, device, is_main):
    output_dir, training, task = config["output_dir"], config["training"], config["task"]
    setup_logging(output_dir, is_main)
    precision = resolve_precision(training["precision"], device)
    if training["base_dtype"] == "auto":  # bf16 runs keep the frozen weights in bf16 (LoRA and head stay fp32);
        # fp16 keeps them in fp32: a base pretrained in bf16 can overflow fp16's range in norms and residuals
        training["base_dtype"] = "bf16" if precision == "bf16" else "fp32"
    if training["base_dtype"] != "fp32" and precision != training["base_dtype"]:
        raise ConfigError(f"base_dtype: {training['base_dtype']} needs precision: {training['base_dtype']} (autocast "
                          f"joins the half-precision base with the fp32 LoRA weights and head); add "
                          f"--precision {training['base_dtype']}")
    set_seed(training["seed"])
    start = time.time()

    # Rank 0 fetches any offline asset first, the others then read it from the cache.
    if world_size > 1 and not is_main:
        dist.barrier()
    splits = load_splits(config)  # data first: a wrong column fails before the model loads
    _check_local_head(config)
    model, tokenizer, model_provenance = load_base_model(config["model_name"], task, config["num_labels"],
                                                         config["fallback"]["offline_model"], training["base_dtype"])
    check_max_length(model, training["max_length"])
    lora = config["lora"]
    try:  # null targets: the family's default; roles (q_proj, v_proj, ...) mean the same on every family
        apply_lora_to_model(model, lora["target_modules"], lora["rank"], lora["alpha"], lora["dropout"],
                            lora["init_B"], lora["scaling"])
    except ValueError as e:  # a target that matches nothing: the message lists the roles and the layer names
        raise ConfigError(f"{e} (model {model_provenance['used']})") from None
    trainable_to_fp32(mark_only_lora_as_trainable(model, bias=lora["bias"]))
    train_set, eval_set, collate, data_provenance, label_map = build_datasets(config, tokenizer, splits)
    if world_size > 1 and is_main:
        dist.barrier()
    if label_map:  # so inference can print names; -1/1 data becomes 0/1
        model.config.id2label = dict(enumerate(data_provenance["label_names"]))
    if training["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    provenance = {"model": model_provenance, "data": data_provenance}
    counts = count_lora_parameters(model)

    log.info(f"device: {device} ({machine_description(device)}), precision: {precision}, world size: {world_size}")
    for kind, p in provenance.items():  # the banner went to the console; the log keeps it too
        if p.get("fallback"):
            log.warning(f"OFFLINE FALLBACK ({kind}): requested {p['requested']}, used {p.get('used', p.get('dataset'))}; "
                        f"why: {p['reason']}")
    log.info(f"model: {model_provenance['used']} [{model_provenance['source']}]; task {task} "
             f"(decided by {config.get('track', {}).get('decided_by', 'the config')})")
    log.info(f"LoRA r={lora['rank']} alpha={lora['alpha']:g} on {describe_lora_layers(model)}"
             + ("" if lora["target_modules"] else " (the family's default targets)"))
    log.info(f"data: {data_provenance.get('dataset', data_provenance['source'])}: {len(train_set)} train / "
             f"{len(eval_set)} eval examples [{data_provenance['source']}]")
    log.info("parameters:\n" + format_parameter_table(counts))

    def loader(examples, batch_size, shuffle):
        return make_loader(examples, collate, batch_size, shuffle, training["group_by_length"], training["seed"],
                           rank, world_size, training["num_workers"])
    train_loader = loader(train_set, training["batch_size"], True)
    eval_loader = loader(eval_set, training["eval_batch_size"], False)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.endswith("bias")], "weight_decay": training["weight_decay"]},
              {"params": [p for n, p in trainable if n.endswith("bias")], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=training["learning_rate"], fused=device.type == "cuda" or None)
    accumulation = training["gradient_accumulation_steps"]
    steps_per_epoch = math.ceil(len(train_loader) / accumulation)
    total_steps = steps_per_epoch * training["num_epochs"]
    if training["max_steps"]:
        total_steps = min(total_steps, training["max_steps"])
    from transformers import get_linear_schedule_with_warmup
    scheduler = get_linear_schedule_with_warmup(optimizer, int(training["warmup_ratio"] * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    # A causal LM's loss over a 49k-word vocabulary would hold (batch x length x vocab) fp32 logits: losses.py
    # computes it chunk by chunk instead. Classification heads are small: the model's own forward.
    train_model = ChunkedCausalLM(model) if task == "causal_lm" else model
    ddp_model = torch.nn.parallel.DistributedDataParallel(train_model) if world_size > 1 else train_model
    metric = TRACKS[task].metric
    higher_is_better = metric == "accuracy"

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "epoch_sums": [0.0, 0.0, 0.0],
             "history": {"train": [], "eval": []}, "epochs": [], "best": None, "train_time_s": 0.0, "eval_time_s": 0.0}
    if args.resume:
        state = load_checkpoint(output_dir, model, optimizer, scheduler, scaler, config)
        log.info(f"resumed from step {state['step']} (epoch {state['epoch'] + 1}, batch {state['batch_in_epoch']})")
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: events a killed run logged after its checkpoint are dropped, not shown twice
        writer = SummaryWriter(config["logging_dir"] or os.path.join(output_dir, "logs"),
                               purge_step=state["step"] if args.resume else 0 if args.overwrite_output_dir else None)
    previous_handler = signal.signal(signal.SIGINT, request_stop) if is_main and world_size == 1 else None

    def save_best(result):
        value = result[metric]
        best = state["best"]
        if best is None or (value > best["value"] if higher_is_better else value < best["value"]):
            state["best"] = {"metric_name": metric, "value": value, "step": state["step"], "epoch": state["epoch"] + 1}
            if is_main:
                commit_overwrite(output_dir)
                save_adapter(model, output_dir, base_model_name_or_path=model_provenance["used"])
                log.info(f"new best eval {metric} {value:.4f}: adapter saved to {output_dir}")

    # Loss and correct counts are summed on the device and brought to the host once per log line, eval or
    # checkpoint: reading them every step would make a GPU wait idle while Python prepares the next step.
    pending, pending_items = torch.zeros(2, dtype=torch.float64, device=device), 0
    if state.get("pending"):  # sums an interrupted run had not flushed: added up in the uninterrupted order
        pending[:] = torch.tensor(state["pending"][:2], dtype=torch.float64)
        pending_items = state["pending"][2]
    state.pop("pending", None)

    def flush_step_sums():
        nonlocal pending_items
        if not pending_items:
            return
        loss_sum, correct = pending.tolist()
        if not math.isfinite(loss_sum):  # checked before any eval or save can see the diverged weights
            raise TrainingDiverged(f"loss became {loss_sum} by step {state['step']}")
        for sums in (window, state["epoch_sums"]):
            sums[0], sums[1], sums[2] = sums[0] + loss_sum, sums[1] + correct, sums[2] + pending_items
        pending.zero_()
        pending_items = 0

    def run_eval(baseline=False):
        flush_step_sums()
        eval_start = time.time()
        result = evaluate(train_model, eval_loader, task, device, precision, world_size, is_main)
        state["eval_time_s"] = state.get("eval_time_s", 0.0) + time.time() - eval_start
        if not all(math.isfinite(v) for v in result.values()):  # never the new best, never a checkpoint
            raise TrainingDiverged(f"eval loss became {result['loss']} at step {state['step']}")
        entry = {"step": state["step"], "epoch": state["epoch"] + 1, **result}
        state["history"]["eval"].append(entry)
        log.info(f"eval step {state['step']}{' (before training)' if baseline else ''}: loss {result['loss']:.4f}, "
                 f"{metric} {result[metric]:.4f}")
        if writer:
            for k, v in result.items():
                writer.add_scalar(f"eval/{k}", v, state["step"])
        if not baseline:  # the untrained model is the reference, never the result
            save_best(result)
        return result

    if state["step"] == 0 and not state["history"]["eval"]:
        # Step 0: B = 0, so the model is exactly the pretrained one. Its loss and metric are the baseline
        # that shows what LoRA changed (the curves start here).
        run_eval(baseline=True)

    interrupted, epoch_start = False, time.time()
    # loss sum, correct, items since the last log line; in the state, so a resumed run logs the same windows
    window = state.setdefault("window", [0.0, 0.0, 0])
    try:
        while state["epoch"] < training["num_epochs"] and not (training["max_steps"] and state["step"] >= total_steps):
            train_loader.batch_sampler.set_epoch(state["epoch"], skip_batches=state["batch_in_epoch"])
            bar = tqdm(train_loader, desc=f"epoch {state['epoch'] + 1}/{training['num_epochs']}",
                       disable=not is_main, initial=state["batch_in_epoch"],
                       total=min(len(train_loader) + state["batch_in_epoch"],  # max_steps may end the epoch early
                                 state["batch_in_epoch"] + (total_steps - state["step"]) * accumulation), leave=False)
            batches_in_epoch = len(train_loader) + state["batch_in_epoch"]
            for batch in bar:
                batch = {k: v.to(device) for k, v in batch.items()}
                state["batch_in_epoch"] += 1
                last_micro = state["batch_in_epoch"] % accumulation == 0 or state["batch_in_epoch"] == batches_in_epoch
                # DDP: all-reduce gradients only on the micro-batch that ends an accumulation
                sync = ddp_model.no_sync() if world_size > 1 and not last_micro else nullcontext()
                with sync:
                    with autocast_context(precision, device):
                        out = ddp_model(**batch)
                    loss = out.loss
                    scaled = loss / accumulation
                    (scaler.scale(scaled) if scaler else scaled).backward()
                items = batch["labels"].shape[0]
                pending[0] += loss.detach().double() * items
                if task == "classification":
                    pending[1] += (out.logits.argmax(-1) == batch["labels"]).sum()
                pending_items += items
                if not last_micro:
                    continue
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for _, p in trainable], training["max_grad_norm"])
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                if state["step"] % training["logging_steps"] == 0 or state["step"] == total_steps:
                    flush_step_sums()
                    entry = {"step": state["step"], "epoch": state["epoch"] + 1, "loss": window[0] / window[2],
                             "lr": scheduler.get_last_lr()[0]}
                    if task == "classification":
                        entry["accuracy"] = window[1] / window[2]
                    state["history"]["train"].append(entry)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in entry.items() if k in ("loss", "accuracy", "lr")})
                    log.info(f"step {state['step']}/{total_steps} " +
                             " ".join(f"{k} {v:.4g}" for k, v in entry.items() if k not in ("step",)))
                    if writer:
                        for k in ("loss", "accuracy", "lr"):
                            if k in entry:
                                writer.add_scalar(f"train/{k}", entry[k], state["step"])
                    window[:] = [0.0, 0.0, 0]
                if training["eval_steps"] and state["step"] % training["eval_steps"] == 0:
                    run_eval()
                for callback in callbacks:
                    callback(state)
                if STOP_REQUESTED or (training["max_steps"] and state["step"] >= total_steps):
                    break
            if STOP_REQUESTED:
                # unflushed sums go into the checkpoint as they are: flushing them now would add them up in
                # another order than an uninterrupted run does, and its logged losses would differ in the last bit
                state["pending"] = pending.tolist() + [pending_items]
                if not math.isfinite(state["pending"][0]):
                    raise TrainingDiverged(f"loss became {state['pending'][0]} by step {state['step']}")
                interrupted = True
                break
            flush_step_sums()
            # end of epoch (or of max_steps)
            sums = state["epoch_sums"]
            epoch_time = time.time() - epoch_start
            state["train_time_s"] += epoch_time
            result = run_eval()
            summary = {"epoch": state["epoch"] + 1, "step": state["step"], "train_loss": sums[0] / max(sums[2], 1),
                       **({"train_accuracy": sums[1] / max(sums[2], 1)} if task == "classification" else {}),
                       **{f"eval_{k}": v for k, v in result.items()}, "time_s": round(epoch_time, 2)}
            state["epochs"].append(summary)
            log.info(f"epoch {state['epoch'] + 1} done: " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in summary.items() if k != "epoch"))
            state.update(epoch=state["epoch"] + 1, batch_in_epoch=0, epoch_sums=[0.0, 0.0, 0.0])
            epoch_start = time.time()
            if is_main and state["epoch"] < training["num_epochs"]:
                save_checkpoint(output_dir, model, optimizer, scheduler, scaler, state, config, provenance)
    except TrainingDiverged as e:
        if writer:
            writer.close()
        raise TrainingDiverged(f"{e}. Training stopped; the last good adapter (if any eval ran) is kept in "
                               f"{output_dir}. Lower learning_rate or max_grad_norm, or use precision: fp32") from None
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    if interrupted:
        state["train_time_s"] += time.time() - epoch_start
        if is_main:
            save_checkpoint(output_dir, model, optimizer, scheduler, scaler, state, config, provenance)
            log.info(f"interrupted at step {state['step']}: checkpoint saved to {output_dir}/checkpoint; "
                     f"continue with the same command plus --resume")
        if writer:
            writer.close()
        return 130

    if is_main:
        finish(config, model, tokenizer, state, counts, provenance, precision, device, world_size, start)
        writer.close()
    return 0


def finish(config, model, tokenizer, state, counts, provenance, precision, device, world_size, start):
    """Write the final adapter, curves, metrics and the parameter/size/memory comparison."""
    output_dir = config["output_dir"]
    commit_overwrite(output_dir)
    save_adapter(model, os.path.join(output_dir, "final"), base_model_name_or_path=provenance["model"]["used"])
    metric = state["best"]["metric_name"]
    plot_training_curves(state["history"], os.path.join(output_dir, "training_curves.png"), metric)
    adapter_bytes = os.path.getsize(os.path.join(output_dir, "adapter_model.safetensors"))
    base_params = counts["total"] - counts["lora"]
    full_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora." not in n)
    peak = peak_memory_mb(device)
    metrics = {
        "best": state["best"], "epochs": state["epochs"], "history": state["history"],
        "parameters": counts, "adapted_layers": describe_lora_layers(model, compact=True), "precision": precision, "device": str(device),
        "machine": machine_description(device), "world_size": world_size,
        "train_time_s": round(state["train_time_s"], 2), "eval_time_s": round(state.get("eval_time_s", 0.0), 2),
        "wall_time_s": round(time.time() - start, 2), "initial_eval": state["history"]["eval"][0],
        "peak_memory_mb": round(peak, 1), "peak_memory_kind": "cuda max allocated" if device.type == "cuda"
        else "process peak RSS", "adapter_bytes": adapter_bytes, "library_versions": library_versions(),
        "label_names": provenance["data"].get("label_names"), "provenance": provenance, "config": config,
    }
    write_json_atomic(os.path.join(output_dir, "training_metrics.json"), metrics)
    comparison = "\n".join([
        "LoRA vs full fine-tuning (measured in this run)",
        "",
        "Parameters",
        f"  base model parameters          {base_params:>14,}",
        f"  trainable with LoRA            {counts['trainable']:>14,}  ({counts['percentage']:.3f}% of total; "
        f"LoRA {counts['lora']:,} + other {counts['trainable'] - counts['lora']:,})",
        f"  trainable with full FT         {base_params:>14,}",
        f"  reduction                      {base_params / counts['trainable']:>13.1f}x fewer trainable parameters",
        "",
        "Files",
        f"  adapter_model.safetensors      {adapter_bytes / 2**20:>11.2f} MB",
        f"  full model weights ({next(model.parameters()).dtype})".ljust(33) + f"{full_bytes / 2**20:>11.2f} MB"
        f"  ({full_bytes / adapter_bytes:.0f}x the adapter)",
        "",
        "Memory",
        f"  peak training memory           {peak:>11.0f} MB  ({metrics['peak_memory_kind']}, "
        f"precision {precision}, batch {config['training']['batch_size']})",
        "  full fine-tuning memory: run benchmarks/ (it is measured there, not guessed here)",
        "",
        f"Model: {provenance['model']['used']} [{provenance['model']['source']}]",
        f"Data: {provenance['data'].get('dataset', '')} [{provenance['data']['source']}]",
    ])
    write_text_atomic(os.path.join(output_dir, "model_comparison.txt"), comparison + "\n")
    point_latest_run(output_dir)
    if os.path.isdir(os.path.join(output_dir, "checkpoint")):
        shutil.rmtree(os.path.join(output_dir, "checkpoint"))  # finished: the adapters above are the result
    log.info(f"eval {metric} before training {metrics['initial_eval'][metric]:.4f} -> best "
             f"{state['best']['value']:.4f} (epoch {state['best']['epoch']}); training time "
             f"{state['train_time_s']:.1f} s, evaluation {metrics['eval_time_s']:.1f} s; peak memory {peak:.0f} MB")
    log.info(f"outputs in {output_dir}: adapter_config.json, adapter_model.safetensors, final/, "
             f"training_curves.png, training_metrics.json, training_log.txt, model_comparison.txt")


# ----------------------------------------------------------------------------- sharing

def push_to_hub(output_dir, hub_model_id, private, metrics_path):
    """Upload the adapter folder with a generated model card."""
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


def main(argv=None, callbacks=()):
    global STOP_REQUESTED
    STOP_REQUESTED = False
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
