"""Shared helpers: configuration, device and precision, model resolution, reports and plots.

Also a command:  python utils.py compare_ranks --results_dir results
"""

import argparse
import copy
import difflib
import json
import math
import os
import platform
import random
import socket
import sys
from contextlib import nullcontext
from urllib.parse import urlparse

import yaml

# ----------------------------------------------------------------------------- configuration

DEFAULT_CONFIG = {
    "model_name": "bert-base-uncased",
    "task": "classification",          # classification | causal_lm
    "num_labels": 2,
    "lora": {
        "rank": 8, "alpha": 16.0, "dropout": 0.05,
        "target_modules": None,        # null: the family's default (W_q, W_v); roles q_proj k_proj v_proj o_proj, layer names, or all
        "scaling": "standard",         # standard: alpha/r | rslora: alpha/sqrt(r) | none: 1
        "init_B": "zeros",             # zeros (the paper) | kaiming (ablation)
        "bias": "none",                # none | all | lora_only
    },
    "training": {
        "num_epochs": 3, "batch_size": 16, "eval_batch_size": 64, "learning_rate": 5e-4,
        "max_length": 128, "warmup_ratio": 0.1, "weight_decay": 0.01, "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0, "precision": "auto", "fp16": False, "bf16": False, "base_dtype": "auto",
        "gradient_checkpointing": False, "seed": 42, "logging_steps": 20, "eval_steps": 0,
        "max_steps": 0, "group_by_length": True, "pad_to_max_length": False, "num_workers": 0,
    },
    "data": {
        "dataset_name": "glue", "dataset_config": "sst2", "train_split": "train",
        "validation_split": "validation", "train_file": None, "validation_file": None,
        "text_column": "sentence", "text_pair_column": None, "label_column": "label",
        "max_train_samples": None, "max_eval_samples": None, "validation_fraction": 0.1,
    },
    "output_dir": None,                # null: results/<run name>; a bare name: results/<name>; a path: as it is
    "logging_dir": None,               # null: logs/<run name> for runs in results/, else <output_dir>/logs
    "device": "auto",                  # auto (cuda, then mps, then cpu) | cuda | cuda:N | mps | cpu
    # Real assets fetched with pip, used (loudly) when the Hub cannot be reached; auto: the asset of the
    # task's own kind (families.TRACKS); null turns that off.
    "fallback": {"offline_model": "auto", "offline_dataset": "auto"},
}

CHOICES = {
    "task": ("classification", "causal_lm"), "scaling": ("standard", "rslora", "none"),
    "init_B": ("zeros", "kaiming"), "bias": ("none", "all", "lora_only"),
    "precision": ("auto", "fp32", "bf16", "fp16"), "base_dtype": ("auto", "fp32", "bf16", "fp16"),
    "offline_model": (None, "auto", "minilm", "smollm2"),
    "offline_dataset": (None, "auto", "rotten_tomatoes", "english_text"),
}
POSITIVE_INT = {"num_labels", "rank", "num_epochs", "batch_size", "eval_batch_size", "max_length",
                "gradient_accumulation_steps"}
NON_NEGATIVE_INT = {"seed", "logging_steps", "eval_steps", "max_steps", "num_workers"}
OPTIONAL_POSITIVE_INT = {"max_train_samples", "max_eval_samples"}
POSITIVE_FLOAT = {"alpha", "learning_rate", "max_grad_norm"}
FLOAT_RANGES = {"dropout": (0.0, 1.0, "[0, 1)"), "warmup_ratio": (0.0, 1.0 + 1e-12, "[0, 1]"),
                "validation_fraction": (1e-9, 1.0, "(0, 1)"), "weight_decay": (0.0, float("inf"), ">= 0")}
MAX_INT = 2**31 - 1
BOOLS = {"fp16", "bf16", "gradient_checkpointing", "group_by_length", "pad_to_max_length"}
# The seed course's flag spellings.
ALIASES = {"model": "model_name", "epochs": "num_epochs", "lr": "learning_rate", "output": "output_dir"}
RESULTS_ROOT, LOGS_ROOT = "results", "logs"  # where runs without an explicit path go (the course's ./results, ./logs)
LATEST_RUN_LINK = "output"  # points at the latest finished run in results/ (the course's `ls output/`)


class ConfigError(ValueError):
    """Bad configuration: reported in one line, exit status 2, before any model loads."""


def _leaf_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,)


LEAF_PATHS = {path[-1]: path for path in _leaf_paths(DEFAULT_CONFIG)}  # every leaf name is unique


def _merge(base, update, where=""):
    for key, value in update.items():
        if key not in base:
            hint = difflib.get_close_matches(key, list(base), n=1)
            raise ConfigError(f"unknown config key '{where}{key}'" + (f" (did you mean '{where}{hint[0]}'?)" if hint
                              else f"; allowed here: {', '.join(base)}"))
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{key}' must be a section with keys {', '.join(base[key])}")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value


def _check_value(key, value):
    """Coerce and check one leaf value; return it or raise ConfigError."""
    def fail(expected):
        raise ConfigError(f"invalid value for '{key}': {value!r}; expected {expected}")

    if key in CHOICES:
        allowed = CHOICES[key]
        if value in (None, "none", "null") and None in allowed:
            return None
        if value not in allowed:
            fail("one of " + ", ".join(str(a) for a in allowed))
        return value
    if key in BOOLS:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if key in POSITIVE_INT | NON_NEGATIVE_INT | OPTIONAL_POSITIVE_INT:
        if value is None and key in OPTIONAL_POSITIVE_INT:
            return None
        try:
            number = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf
            number = None
        low = 0 if key in NON_NEGATIVE_INT else 1
        if number is None or not low <= number <= MAX_INT:  # 1e30 would reach the model as a huge tensor size
            fail(f"an integer in [{low}, {MAX_INT}]")
        return number
    if key in POSITIVE_FLOAT or key in FLOAT_RANGES:
        try:
            number = float(value)  # YAML reads 5e-4 as a string: accept it
        except (TypeError, ValueError):
            fail("a number")
        if not math.isfinite(number):  # inf or nan would train nothing but nan
            fail("a finite number")
        if key in POSITIVE_FLOAT and not number > 0:
            fail("a number > 0")
        if key in FLOAT_RANGES:
            low, high, text = FLOAT_RANGES[key]
            if not low <= number < high:
                fail(f"a number in {text}")
        return number
    if key == "target_modules":
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not value or not all(isinstance(v, str) and v for v in value):
            fail("a list of module names, or all")
        return "all" if list(value) == ["all"] else list(value)
    if key == "device":
        if not (value in ("auto", "cpu", "mps", "cuda") or str(value).startswith("cuda:")):
            fail("auto, cuda, cuda:N, mps or cpu")
        return value
    if value is not None and not isinstance(value, str):
        fail("a string")
    if key == "model_name" and not value:
        fail("a non-empty string")
    return value


def validate_config(config):
    for path in _leaf_paths(DEFAULT_CONFIG):
        section = config
        for part in path[:-1]:
            section = section[part]
        section[path[-1]] = _check_value(path[-1], section[path[-1]])
    training = config["training"]
    if training["fp16"] and training["bf16"]:
        raise ConfigError("fp16 and bf16 are both true; choose one (or set precision: auto)")
    for flag in ("fp16", "bf16"):  # the seed's switches are shorthands for precision
        if training[flag]:
            if training["precision"] not in ("auto", flag):
                raise ConfigError(f"{flag}: true contradicts precision: {training['precision']}; set one of them")
            training["precision"] = flag
    data = config["data"]
    if data["validation_file"] and not data["train_file"]:
        raise ConfigError("validation_file is set without train_file; set train_file too")
    for key in ("train_file", "validation_file"):
        if data[key] and not os.path.isfile(data[key]):
            raise ConfigError(f"{key} '{data[key]}' does not exist; check the path")
        if data[key] and not data[key].endswith((".csv", ".json", ".jsonl", ".txt")):
            raise ConfigError(f"{key} '{data[key]}' must be .csv, .json, .jsonl or .txt")
    if config["task"] == "classification" and data["train_file"] and data["train_file"].endswith(".txt"):
        raise ConfigError("classification needs labels: use a .csv or .json train_file, or task: causal_lm")
    return config


def build_arg_parser(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: built-in defaults = config.yaml)")
    for key, path in LEAF_PATHS.items():
        flags = [f"--{key}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == key]
        default_value = DEFAULT_CONFIG
        for part in path:
            default_value = default_value[part]
        kwargs = {"dest": key, "default": None, "help": f"config {'.'.join(path)} (default {default_value!r})"}
        if key == "target_modules":
            kwargs["nargs"] = "+"
        elif key in BOOLS:
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace a finished run's results")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the adapter with a model card")
    parser.add_argument("--hub_model_id", default=None, help="user/name for --push_to_hub")
    parser.add_argument("--hub_private", action="store_true", help="create the Hub repo as private")
    return parser


def _read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of keys to values")
    return loaded


def _leaves(tree):
    """{leaf name: value} of a nested config (every leaf name is unique)."""
    flat = {}
    for key, value in tree.items():
        flat.update(_leaves(value) if isinstance(value, dict) else {key: value})
    return flat


def load_config(args):
    """Defaults <- the track's config <- your YAML file <- command-line flags, then validated.

    The track (classification or causal LM) is the task you set, else the one the model's own config says
    (families.detect_task): `--model gpt2` alone runs the GPT-2 track. Keys you did not set follow it.
    Raises ConfigError.
    """
    import families
    user = _read_yaml(args.config) if args.config else {}
    flags = {key: getattr(args, key) for key in LEAF_PATHS if getattr(args, key, None) is not None}
    check = copy.deepcopy(DEFAULT_CONFIG)
    _merge(check, user)  # unknown keys fail here, before anything is looked up
    model_name = os.path.expanduser(str(flags.get("model_name") or check["model_name"]))
    if families.is_path_like(model_name) and not os.path.isdir(model_name):
        raise ConfigError(f"model '{model_name}' looks like a path but no such folder exists; check the path, "
                          f"or pass a Hugging Face id such as gpt2 or bert-base-uncased")
    flags["model_name"] = model_name
    own_task, task_reason = families.detect_task(model_name)
    task = flags.get("task") or user.get("task")
    if task is not None:
        task_reason = "set in your config or flags"
    elif own_task is None:
        raise ConfigError(f"cannot tell whether '{model_name}' is a classifier or a causal LM ({task_reason}); "
                          f"pass --task classification or --task causal_lm")
    task = _check_value("task", task or own_task)
    track = copy.deepcopy(DEFAULT_CONFIG)
    if task == "causal_lm":
        _merge(track, _read_yaml(families.track_config_path("causal_lm")))
    config = copy.deepcopy(track)
    _merge(config, user)
    for key, value in flags.items():
        section = config
        for part in LEAF_PATHS[key][:-1]:
            section = section[part]
        section[LEAF_PATHS[key][-1]] = value
    config["task"] = task
    config = validate_config(config)
    for key in ("offline_model", "offline_dataset"):
        if config["fallback"][key] == "auto":
            config["fallback"][key] = getattr(families.TRACKS[config["task"]], key)
    asset = config["fallback"]["offline_model"]
    if asset and families.ASSET_TASKS[asset] != config["task"]:
        raise ConfigError(f"fallback.offline_model {asset} is a {families.ASSET_TASKS[asset]} model but the task "
                          f"is {config['task']}; use offline_model: auto")
    # a task other than the model's own (GPT-2 as a classifier) is part of the run's name
    name_extra = [f"task-{task}"] if own_task and task != own_task else []
    config["output_dir"], config["logging_dir"] = run_folders(config, validate_config(track), name_extra)
    config["track"] = {"task": config["task"], "decided_by": task_reason,
                       "named_by_configuration": (flags.get("output_dir") or user.get("output_dir")) is None}
    return config


def run_folders(config, track_defaults, name_extra=()):
    """(output_dir, logging_dir). No output_dir: one folder per configuration, results/<run name>, named by
    the model and every setting that differs from the track's defaults, so a sweep never overwrites or
    refuses an earlier run with other settings. A bare name goes to results/<name>; a path is kept."""
    output_dir = config["output_dir"]
    if output_dir and (os.sep in output_dir or "/" in output_dir or output_dir.startswith((".", "~"))):
        return output_dir, config["logging_dir"] or os.path.join(output_dir, "logs")
    name = output_dir or run_name(config, track_defaults, name_extra)
    return os.path.join(RESULTS_ROOT, name), config["logging_dir"] or os.path.join(LOGS_ROOT, name)


def run_name(config, track_defaults, extra=()):
    """e.g. gpt2, bert-base-uncased_alpha4, bert-base-uncased_rank16_target_modules-q_proj+k_proj+v_proj."""
    ignored = {"model_name", "output_dir", "logging_dir", "device", "num_workers", "offline_model",
               "offline_dataset", "logging_steps", "eval_batch_size"}  # these do not change the result
    default, current = _leaves(track_defaults), _leaves(config)
    model = str(config["model_name"]).rstrip("/")
    parts = [os.path.basename(model) if os.path.isdir(model) else model.replace("/", "--")] + list(extra)
    for key in LEAF_PATHS:
        if key in ignored or current[key] == default[key]:
            continue
        value = current[key]
        value = "+".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else os.path.basename(str(value))
        parts.append(f"{key}{value}" if key in ("rank", "alpha") else f"{key}-{value}")
    name = "_".join(parts).replace(" ", "")
    name = "".join(c if c.isalnum() or c in "+-_.=" else "-" for c in name)
    if len(name) > 100:  # still one folder per configuration: the hash tells long names apart
        import hashlib
        name = name[:90] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


# ----------------------------------------------------------------------------- device, precision, seeds

def pick_device(name="auto"):
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def cpu_has_native_bf16():
    """True where the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and far slower than fp32 (measured 66x slower on an AVX2-only AMD EPYC)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision, device):
    """auto -> bf16 on bf16-capable CUDA and on CPUs with native bf16, fp16 on older CUDA, else fp32."""
    import torch
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("fp16 autocast needs a GPU; on CPU use precision: bf16 or fp32 (or auto)")
    return precision


def autocast_context(precision, device):
    """Mixed precision for the forward pass; LoRA weights and optimizer state stay fp32."""
    import torch
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def trainable_to_fp32(model):
    """Upcast what trains (the head, trained biases) on a bf16/fp16 base: like the LoRA weights, small updates
    would vanish in half precision. Autocast then joins them with the half-precision base."""
    import torch
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def set_seed(seed):
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- Hub access and models

_HUB_REACHABLE = None
OFFLINE_REASON = None


def hub_reachable(timeout=3.0):
    """One quick TCP check of the Hub endpoint per process (a failing Hub call otherwise retries for ~26 s)."""
    global _HUB_REACHABLE, OFFLINE_REASON
    if _HUB_REACHABLE is None:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            _HUB_REACHABLE, OFFLINE_REASON = False, "HF_HUB_OFFLINE is set"
        else:
            from huggingface_hub import constants
            url = urlparse(constants.ENDPOINT)
            try:
                socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
                _HUB_REACHABLE = True
            except OSError as e:
                _HUB_REACHABLE, OFFLINE_REASON = False, f"the Hugging Face Hub ({url.hostname}) cannot be reached ({e})"
        if not _HUB_REACHABLE:
            go_offline()
    return _HUB_REACHABLE


def go_offline():
    """Tell huggingface_hub, transformers and datasets to use only local files from now on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config
        datasets.config.HF_HUB_OFFLINE = True


def banner(lines):
    width = max(len(line) for line in lines) + 4
    text = "\n".join(["#" * width] + [f"# {line.ljust(width - 4)} #" for line in lines] + ["#" * width])
    print(text, flush=True)
    return text


# Hub ids of the offline assets: an adapter trained on a fallback records the real model it used.
ASSET_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                 "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def resolve_model_source(model_name, fallback=None):
    """Where to load `model_name` from: (path_or_id, provenance). Order: local folder, Hub or its local
    cache, then the offline fallback asset (with a banner saying what was replaced by what and why)."""
    import assets
    if os.path.isdir(model_name):
        return model_name, {"requested": model_name, "used": os.path.abspath(model_name), "source": "local folder"}
    asset = model_name if model_name in assets.FALLBACK_MODELS else None
    if asset is None and model_reachable(model_name):
        return model_name, {"requested": model_name, "used": model_name,
                            "source": "Hugging Face Hub" if hub_reachable() else "Hugging Face local cache"}
    asset = asset or next((a for a, hub_id in ASSET_HUB_IDS.items() if hub_id == model_name), None)
    if asset is not None:  # asked for by name, or the same model shipped as a pip package
        return assets.model_dir(asset), {"requested": model_name, "used": ASSET_HUB_IDS[asset],
                                         "source": assets.PROVENANCE[asset]}
    if not fallback:
        raise ConfigError(f"model '{model_name}' is not in the local cache and the Hugging Face Hub cannot be "
                          f"reached; connect, pass a local folder, or set fallback.offline_model")
    reason = OFFLINE_REASON
    banner([f"OFFLINE FALLBACK: model '{model_name}' replaced by {ASSET_HUB_IDS[fallback]}",
            f"why: {reason} and '{model_name}' is not in the local cache",
            f"from: {assets.PROVENANCE[fallback]}",
            "results below are for the fallback model, not the one requested"])
    return assets.model_dir(fallback), {"requested": model_name, "used": ASSET_HUB_IDS[fallback],
                                        "source": assets.PROVENANCE[fallback], "fallback": True, "reason": reason}


def model_reachable(model_name):
    """True if `model_name` loads without the offline fallback: a folder, the Hub, or the local cache."""
    return os.path.isdir(model_name) or hub_reachable() or _in_hf_cache(model_name)


def _in_hf_cache(model_name):
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(model_name, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def load_base_model(model_name, task, num_labels=2, fallback=None, dtype="fp32"):
    """(model, tokenizer, provenance) for training and inference alike. dtype (fp32 | bf16 | fp16) is always
    passed: transformers 5 would otherwise load the checkpoint's own dtype, bf16 for most new LLMs, which
    a CPU without native bf16 runs many times slower than fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    source, provenance = resolve_model_source(model_name, fallback)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    offline = {} if hub_reachable() else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source, **offline)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected: we train it
    hf_logging.disable_progress_bar()
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels,
                                                                       dtype=torch_dtype, **offline)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **offline)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:  # GPT-2 and Llama ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, provenance


# ----------------------------------------------------------------------------- reports

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
    import torch
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
    import torch
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


def save_figure_atomic(fig, path):
    """Save a matplotlib figure under a temporary name, then rename: a reader never sees half a PNG."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write_text_atomic(path, text):
    """Write to a temporary name, then rename: a reader or a crash never sees half a file."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json_atomic(path, data):
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- compare_ranks

SWEEP_FIELDS = ("rank", "alpha", "target_modules", "learning_rate", "scaling", "precision")


def collect_runs(results_dir):
    """Every training_metrics.json below results_dir: (runs, problems). A file that cannot be read or lacks a
    value the table needs is a problem (the run is skipped), never an abort of the whole table. Hidden folders
    (a run being overwritten is moved aside into one) are not runs."""
    runs, problems = [], []
    for root, dirs, files in os.walk(results_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "training_metrics.json" in files:
            path = os.path.join(root, "training_metrics.json")
            try:
                with open(path, encoding="utf-8") as f:
                    metrics = json.load(f)
                runs.append({"run": os.path.relpath(root, results_dir), **_run_row(metrics)})
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:  # ValueError: JSON, UTF-8
                problems.append(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return runs, problems


def _number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a number")
    return value


def _run_row(metrics):
    config = metrics["config"]
    targets = metrics.get("adapted_layers") or config["lora"]["target_modules"] or "default"
    metric = metrics["best"]["metric_name"]
    if metric not in ("accuracy", "perplexity"):
        raise ValueError(f"best metric_name is {metric!r}")
    peak = metrics.get("peak_memory_mb")
    return {"rank": _number(config["lora"]["rank"], "rank"), "alpha": _number(config["lora"]["alpha"], "alpha"),
            "target_modules": targets if isinstance(targets, str) else ",".join(targets),
            "learning_rate": config["training"]["learning_rate"], "scaling": config["lora"]["scaling"],
            "precision": metrics.get("precision"), "trainable": int(_number(metrics["parameters"]["trainable"],
                                                                            "trainable parameters")),
            "metric": metric, "best": _number(metrics["best"]["value"], "best value"),
            "time_s": _number(metrics["train_time_s"], "train_time_s"),
            "peak_mb": _number(peak, "peak_memory_mb") if peak is not None else None}


def compare_ranks(results_dir, sort_by=None):
    if not os.path.isdir(results_dir):
        raise ConfigError(f"results_dir '{results_dir}' does not exist; train some runs into it first")
    runs, problems = collect_runs(results_dir)
    for problem in problems:
        print(f"warning: skipped {problem}")
    if not runs:
        raise ConfigError(f"no training_metrics.json found below '{results_dir}'; run e.g. "
                          f"python train_lora_basic.py --rank 4 --output_dir {results_dir}/rank_4")
    varying = [f for f in SWEEP_FIELDS if len({str(r[f]) for r in runs}) > 1] or ["rank"]
    key = sort_by or varying[0]
    runs.sort(key=lambda r: (r[key] is None, str(type(r[key])), r[key] if r[key] is not None else 0))
    metrics = sorted({r["metric"] for r in runs})
    print(f"{len(runs)} runs in {results_dir}; varying: {', '.join(varying)}")
    if len(metrics) > 1:  # accuracy (higher is better) and perplexity (lower) are never one column
        print(f"note: these runs report different metrics ({' and '.join(metrics)}); compare each within its own")
    # the metric is named on every row: a classification and a language-model run can share a results folder
    # run folders are named by their configuration (results/<model>_<what differs>): show the whole name
    width = min(max(len(r["run"]) for r in runs), 80) + 1
    header = f"{'run':<{width}}{'rank':>5}{'alpha':>7}  {'targets':<18}{'trainable':>11}  {'metric':<11}{'best':>9}" \
             f"{'time s':>9}{'peak MB':>9}"
    print(header + "\n" + "-" * len(header))
    for r in runs:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        print(f"{r['run'][:width - 1]:<{width}}{r['rank']:>5}{r['alpha']:>7g}  {r['target_modules'][:17]:<18}{r['trainable']:>11,}"
              f"  {r['metric']:<11}{r['best']:>9.4f}{r['time_s']:>9.1f}{peak:>9}")
    plot_path = os.path.join(results_dir, f"comparison_{key}.png")
    _plot_comparison(runs, key, plot_path)
    print(f"plot: {plot_path}")
    return runs


def _plot_comparison(runs, key, path):
    """Best metric, trainable parameters and time per run; one metric panel per metric (never mixed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = sorted({r["metric"] for r in runs})
    panels = [("best", f"best {m}", m) for m in metrics] + [("trainable", "trainable parameters", None),
                                                             ("time_s", "training time (s)", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    for ax, (field, title, metric) in zip(axes, panels):
        shown = [r for r in runs if metric is None or r["metric"] == metric]
        labels = [str(r[key]) for r in shown]
        values = [r[field] for r in shown]
        ax.bar(range(len(shown)), values, color="tab:blue")
        ax.set_xticks(range(len(shown)), labels, rotation=30 if len(labels) > 6 else 0)
        ax.set(title=title, xlabel=key)
        ax.grid(axis="y", alpha=0.3)
        if metric is not None:
            ax.set_ylim(min(values) - 0.05 * (abs(min(values)) or 1), max(values) * 1.02 or 1)
    save_figure_atomic(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare LoRA runs (rank or alpha sweeps).")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare_ranks", help="table and plot of every run below --results_dir")
    cmp.add_argument("--results_dir", default="results")
    cmp.add_argument("--sort_by", choices=SWEEP_FIELDS, default=None, help="default: the first field that varies")
    args = parser.parse_args(argv)
    try:
        compare_ranks(args.results_dir, args.sort_by)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
