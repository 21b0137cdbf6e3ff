"""What a run reports: machine and versions, peak memory, the parameter table, the training curves, and the one
way every result file is written (atomically: a reader or a crash never sees half a file).
"""

import json
import os
import platform
import sys

import torch

from lora_linear import write_atomically



def library_versions():
    import importlib.metadata as md
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "datasets", "safetensors", "peft"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions



def machine_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"



def peak_memory_mb(device):
    """Peak memory of this process: CUDA max allocated, else peak resident set size (RSS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024



def format_parameter_table(counts):
    return "\n".join([
        f"{'Total parameters':<22}{counts['total']:>14,}",
        f"{'Trainable parameters':<22}{counts['trainable']:>14,}",
        f"{'Frozen parameters':<22}{counts['frozen']:>14,}",
        f"{'  of which LoRA':<22}{counts['lora']:>14,}" if counts["lora"] else "",
        f"{'Trainable %':<22}{counts['percentage']:>13.4f}%",
    ]).replace("\n\n", "\n")



def plot_training_curves(history, path, metric_name):
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



def save_figure_atomic(fig, path: str) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_text_atomic(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomically(path, write)


def write_json_atomic(path: str, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
