"""What a run reports: machine and versions, peak memory, the parameter table, the training curves, and the one
way every result file is written (atomically: a reader or a crash never sees half a file).
"""

import json
import os
import platform
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Dict, Tuple

import torch

from lora_linear import ROLES, lora_layers, write_atomically

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from train_lora_basic import Run  # a type only: train_lora_basic imports this module


def library_versions() -> Dict[str, str]:
    """Python's and the main libraries' versions (those installed), recorded with every result."""
    import importlib.metadata as md
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "safetensors", "peft"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def machine_description(device: torch.device) -> str:
    """What a result was measured on: the GPU's name, or the CPU model with its core and torch thread counts."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def describe_lora_layers(model: torch.nn.Module, compact: bool = False) -> str:
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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated, else peak resident set size (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def format_parameter_table(counts: Dict[str, float]) -> str:
    """count_lora_parameters' counts as an aligned table for the log (the LoRA row only when there is LoRA)."""
    return "\n".join([
        f"{'Total parameters':<22}{counts['total']:>14,}",
        f"{'Trainable parameters':<22}{counts['trainable']:>14,}",
        f"{'Frozen parameters':<22}{counts['frozen']:>14,}",
        f"{'  of which LoRA':<22}{counts['lora']:>14,}" if counts["lora"] else "",
        f"{'Trainable %':<22}{counts['percentage']:>13.4f}%",
    ]).replace("\n\n", "\n")


def plot_training_curves(history: dict, path: str, metric_name: str) -> None:
    """Loss (train, eval) and the task metric per epoch, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history["train"]]
    left.plot(steps, [h["loss"] for h in history["train"]], label="train (logged steps)", alpha=0.7)
    if history["eval"]:
        left.plot([h["step"] for h in history["eval"]], [h["loss"] for h in history["eval"]], "o-", label="eval")
        right.plot([h["step"] for h in history["eval"]], [h[metric_name] for h in history["eval"]], "o-",
                   color="tab:green", label=f"eval {metric_name}")
    train_metric = [h for h in history["train"] if metric_name in h]
    if train_metric:
        right.plot([h["step"] for h in train_metric], [h[metric_name] for h in train_metric], alpha=0.7,
                   label=f"train {metric_name} (logged steps)")
    left.set(title="Loss", xlabel="optimizer step", ylabel="loss")
    right.set(title=metric_name.capitalize(), xlabel="optimizer step", ylabel=metric_name)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure_atomic(fig, path)


def save_figure_atomic(fig: "Figure", path: str) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_text_atomic(path: str, text: str) -> None:
    """`text` into `path` as UTF-8, written atomically (write_atomically)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically(path, write)


def write_json_atomic(path: str, data: Any) -> None:
    """`data` as indented JSON, written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def wall_time_and_peak(run: "Run") -> Tuple[float, float]:
    """(seconds, MB): the run's wall time and peak memory so far, with a resumed run's earlier processes (up to
    the checkpoint it resumed from, run.earlier) counted, not only this one."""
    earlier_seconds, earlier_peak = run.earlier
    return earlier_seconds + time.time() - run.start, max(earlier_peak, peak_memory_mb(run.device))


def write_run_report(run: "Run") -> dict:
    """training_metrics.json, training_curves.png and model_comparison.txt for a finished run (train_lora_basic.Run);
    returns the metrics."""
    config, model, state, counts, provenance = run.config, run.model, run.state, run.counts, run.provenance
    output_dir, device = config["output_dir"], run.device
    metric = state["best"]["metric_name"]
    plot_training_curves(state["history"], os.path.join(output_dir, "training_curves.png"), metric)
    adapter_bytes = os.path.getsize(os.path.join(output_dir, "adapter_model.safetensors"))
    base_params = counts["total"] - counts["lora"]
    full_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora." not in n)
    wall_time, peak = wall_time_and_peak(run)
    metrics = {
        "best": state["best"], "epochs": state["epochs"], "history": state["history"],
        "parameters": counts, "adapted_layers": describe_lora_layers(model, compact=True), "precision": run.precision,
        "precision_reason": run.precision_reason, "device": str(device),
        "machine": machine_description(device), "world_size": run.world_size,
        "train_time_s": round(state["train_time_s"], 2), "eval_time_s": round(state.get("eval_time_s", 0.0), 2),
        "wall_time_s": round(wall_time, 2), "initial_eval": state["history"]["eval"][0],
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
        f"precision {run.precision}, batch {config['training']['batch_size']})",
        "  full fine-tuning memory: run benchmarks/ (it is measured there, not guessed here)",
        "",
        f"Model: {provenance['model']['used']} [{provenance['model']['source']}]",
        f"Data: {provenance['data'].get('dataset', '')} [{provenance['data']['source']}]",
    ])
    write_text_atomic(os.path.join(output_dir, "model_comparison.txt"), comparison + "\n")
    return metrics
