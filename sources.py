"""Where the model and the data come from: a local path, the Hugging Face Hub or its local cache, or, when the
Hub cannot be reached, a real offline asset of the same kind fetched with pip (assets.py). Training, inference and
the experiments load through here, so the fallback happens in one place and is always said: a banner on the
console, and the provenance recorded in every output.
"""

import csv
import io
import json
import math
import os
import socket
import sys
from typing import TYPE_CHECKING, Any, List, Optional, Tuple
from urllib.parse import urlparse

import assets
from config import ConfigError

if TYPE_CHECKING:  # torch is imported where a model is loaded
    import torch


# ----------------------------------------------------------------------------- the Hub

_HUB_REACHABLE = None

OFFLINE_REASON = None


def hub_reachable(timeout: float = 3.0) -> bool:
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


def go_offline() -> None:
    """Tell huggingface_hub, transformers and datasets to use only local files from now on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config
        datasets.config.HF_HUB_OFFLINE = True


def banner(lines: List[str]) -> str:
    """Print `lines` framed in '#' (an offline fallback must not go unnoticed in the console); returns the text."""
    width = max(len(line) for line in lines) + 4
    text = "\n".join(["#" * width] + [f"# {line.ljust(width - 4)} #" for line in lines] + ["#" * width])
    print(text, flush=True)
    return text


# ----------------------------------------------------------------------------- models

# Hub ids of the offline assets: an adapter trained on a fallback records the real model it used.
ASSET_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                 "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def resolve_model_source(model_name: str, fallback: Optional[str] = None) -> Tuple[str, dict]:
    """Where to load `model_name` from: (path_or_id, provenance). Order: local folder, Hub or its local
    cache, then the offline fallback asset (with a banner saying what was replaced by what and why)."""
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
                          f"reached; connect, or pass a local folder (training: or set fallback.offline_model)")
    reason = OFFLINE_REASON
    banner([f"OFFLINE FALLBACK: model '{model_name}' replaced by {ASSET_HUB_IDS[fallback]}",
            f"why: {reason} and '{model_name}' is not in the local cache",
            f"from: {assets.PROVENANCE[fallback]}",
            "results below are for the fallback model, not the one requested"])
    return assets.model_dir(fallback), {"requested": model_name, "used": ASSET_HUB_IDS[fallback],
                                        "source": assets.PROVENANCE[fallback], "fallback": True, "reason": reason}


def falls_back(model_name: str) -> bool:
    """True when resolve_model_source would replace `model_name` by the offline fallback asset: the run then
    trains another model, so its results folder is named for that (config.run_folders)."""
    return not (model_name in assets.FALLBACK_MODELS or model_name in ASSET_HUB_IDS.values()
                or model_reachable(model_name))


def model_reachable(model_name: str) -> bool:
    """True if `model_name` loads without the offline fallback: a folder, the Hub, or the local cache."""
    return os.path.isdir(model_name) or hub_reachable() or _in_hf_cache(model_name)


def _in_hf_cache(model_name):
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(model_name, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def load_error_line(e: Exception) -> str:
    """One line for an error from from_pretrained: its type and first line, or the line that names a size
    mismatch (a head of another size) when its message lists one per tensor."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
    return f"{type(e).__name__}: {line[:300]}"


def load_base_model(model_name: str, task: str, num_labels: int = 2, fallback: Optional[str] = None,
                    dtype: str = "fp32") -> Tuple["torch.nn.Module", Any, dict]:
    """(model, tokenizer, provenance) for training and inference alike. dtype (fp32 | bf16 | fp16) is always
    passed: transformers 5 would otherwise load the checkpoint's own dtype, bf16 for most new LLMs, which
    a CPU without native bf16 runs many times slower than fp32. A checkpoint that cannot be loaded (truncated
    weights, a head of another size, missing tokenizer files) or a fallback that cannot be fetched is a
    ConfigError of one line."""
    from safetensors import SafetensorError
    try:
        return _load_base_model(model_name, task, num_labels, fallback, dtype)
    except ConfigError:
        raise
    except assets.AssetError as e:
        raise ConfigError(f"the offline fallback for '{model_name}' could not be prepared: {e}") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise ConfigError(f"model '{model_name}' cannot be loaded as a {task} model ({load_error_line(e)})") from None


def _load_base_model(model_name: str, task: str, num_labels: int, fallback: Optional[str],
                     dtype: str) -> Tuple["torch.nn.Module", Any, dict]:
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
    vocabulary = getattr(model.config, "vocab_size", None)
    if isinstance(vocabulary, int) and len(tokenizer) < vocabulary // 2:
        # transformers 5 builds an empty tokenizer (special tokens only) for a folder without tokenizer files:
        # every word would become [UNK] and the run would train on nothing
        raise ConfigError(f"model '{model_name}': its tokenizer has {len(tokenizer)} tokens for a model of "
                          f"{vocabulary}; the tokenizer files (tokenizer.json, vocab.txt, ...) are missing: save "
                          f"the tokenizer into that folder too (tokenizer.save_pretrained)")
    if tokenizer.pad_token is None:  # GPT-2 and Llama ship without one
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, provenance


def check_local_head(config: dict) -> None:
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
        fix = (f"set num_labels: {labels} or start from a model without a head" if labels >= 2 else
               "start from a model without a head (a 1-output head is a regressor)")
        raise ConfigError(f"model '{config['model_name']}' has a {labels}-label classification head but num_labels "
                          f"is {config['num_labels']}; {fix}")


# ----------------------------------------------------------------------------- data


def load_splits(config: dict) -> Tuple[List[dict], List[dict], dict, tuple]:
    """(train_rows, eval_rows, provenance, columns): lists of dicts plus where they came from."""
    data, task, seed = config["data"], config["task"], config["training"]["seed"]
    if data["train_file"]:
        columns = (data["text_column"], data["text_pair_column"], data["label_column"])
        train, validation = read_local_file(data["train_file"], columns, task), None
        if data["validation_file"]:
            validation = read_local_file(data["validation_file"], columns, task)
        else:
            train, validation = assets.seeded_split(train, data["validation_fraction"], seed)
        provenance = {"source": "local files", "train_file": os.path.abspath(data["train_file"]),
                      "validation_file": os.path.abspath(data["validation_file"]) if data["validation_file"]
                      else f"seeded {data['validation_fraction']:.0%} split of train_file (seed {seed})"}
    else:
        train, validation, provenance, columns = _load_hub_or_fallback(config)
        _check_columns(validation, columns, task, f"{provenance['source']} (validation)")
    _check_columns(train, columns, task, provenance["source"])
    train, validation = _limit(train, data["max_train_samples"]), _limit(validation, data["max_eval_samples"])
    provenance.update(train_rows=len(train), eval_rows=len(validation))
    return train, validation, provenance, columns


def read_local_file(path, columns, task):
    """Rows of a local .txt/.csv/.jsonl/.json file, checked row by row: a bad row is a ConfigError that names
    the file and the line (or item), never a traceback or a row trained as the string "None"."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text (byte {e.start}); "
                          f"save the file as UTF-8") from None
    lines = io.StringIO(text, newline=None)  # \r\n and \r read as \n, as open() does
    if path.endswith(".txt"):  # one example per line
        return [{columns[0]: line.rstrip("\n")} for line in lines]
    rows, where = [], []
    if path.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            if None in row or None in row.values():  # more or fewer fields than the header
                fields = len(row) - (None in row) - sum(v is None for v in row.values()) + len(row.get(None) or [])
                raise ConfigError(f"{path} line {reader.line_num}: {fields} field(s) but the header has "
                                  f"{len(reader.fieldnames)} ({', '.join(reader.fieldnames)})")
            rows.append(row)
            where.append(f"line {reader.line_num}")
    elif path.endswith(".jsonl"):
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number}: expected a JSON object per line, got {_kind(row)}")
            rows.append(row)
            where.append(f"line {number}")
    else:  # a list of objects, or {"data": [...]}
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(loaded, dict):
            if "data" not in loaded:
                raise ConfigError(f"{path}: a JSON object must hold the examples under \"data\" (its keys: "
                                  f"{', '.join(map(str, list(loaded)[:5])) or 'none'}); or write a list of objects")
            loaded = loaded["data"]
        if not isinstance(loaded, list):
            raise ConfigError(f"{path}: expected a list of objects, got {_kind(loaded)}")
        for number, row in enumerate(loaded):
            if not isinstance(row, dict):
                raise ConfigError(f"{path} item {number}: expected an object with the example's fields, "
                                  f"got {_kind(row)}")
        rows, where = loaded, [f"item {i}" for i in range(len(loaded))]
    if not rows:
        raise ConfigError(f"{path} holds no examples")
    _check_columns(rows, columns, task, path, where)
    return rows


def _kind(value):
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}")


def _limit(rows, limit):
    return rows[:limit] if limit else rows


def _load_hub_or_fallback(config):
    data = config["data"]
    name, subset = data["dataset_name"], data["dataset_config"]
    label = f"{name}/{subset}" if subset else name
    reason = None
    if dataset_reachable(name):
        from datasets import load_dataset
        try:
            dataset = load_dataset(name, subset)
            columns = (data["text_column"], data["text_pair_column"], data["label_column"])
            return (dataset[data["train_split"]].to_list(), dataset[data["validation_split"]].to_list(),
                    {"source": "Hugging Face Hub", "dataset": label, "splits": [data["train_split"],
                                                                              data["validation_split"]]}, columns)
        except (ConnectionError, OSError) as e:  # includes the offline "not cached" errors
            reason = f"loading it failed ({type(e).__name__})"
    fallback = config["fallback"]["offline_dataset"]
    if not fallback:
        raise ConfigError(f"dataset '{label}' cannot be loaded (Hub unreachable, not cached); connect, use "
                          f"train_file, or set fallback.offline_dataset")
    reason = reason or OFFLINE_REASON
    banner([f"OFFLINE FALLBACK: dataset '{label}' replaced by {fallback}",
            f"why: {reason}",
            f"from: {assets.PROVENANCE[fallback]}",
            f"split: seeded {data['validation_fraction']:.0%} validation (seed {config['training']['seed']})"])
    loader = assets.rotten_tomatoes if fallback == "rotten_tomatoes" else assets.english_text
    train, validation = loader(seed=config["training"]["seed"], validation_fraction=data["validation_fraction"])
    columns = ("sentence", None, "label") if fallback == "rotten_tomatoes" else ("text", None, None)
    return train, validation, {"source": assets.PROVENANCE[fallback], "dataset": fallback, "requested": label,
                               "fallback": True, "reason": reason}, columns


def dataset_falls_back(config: dict) -> bool:
    """True when load_splits would replace the config's Hub dataset by the offline fallback asset (no local
    files, the Hub unreachable, the dataset not cached): the run then trains on other data, so its results
    folder is named for that (config.run_folders)."""
    return bool(config["fallback"]["offline_dataset"]) and not config["data"]["train_file"] \
        and not dataset_reachable(config["data"]["dataset_name"])


def dataset_reachable(name: str) -> bool:
    """True if the Hub dataset `name` can be loaded: the Hub, or the datasets cache."""
    return hub_reachable() or _in_datasets_cache(name)


def _in_datasets_cache(name):
    from datasets import config as datasets_config
    cache = datasets_config.HF_DATASETS_CACHE
    return bool(name) and os.path.isdir(cache) and any(name.replace("/", "___") in d for d in os.listdir(cache))


def _check_columns(rows, columns, task, source, where=None):
    """Every row has every needed column, texts are strings, labels are numbers or strings of one kind."""
    text, pair, label = columns
    if not rows:
        raise ConfigError(f"the training data from {source} is empty")
    needed = [c for c in ((text, pair, label) if task == "classification" else (text,)) if c]
    missing = [c for c in needed if c not in rows[0]]
    if missing:
        raise ConfigError(f"column(s) {', '.join(missing)} not in the data (columns: {', '.join(rows[0])}); "
                          f"set text_column / text_pair_column / label_column")
    label_kind = None
    for i, row in enumerate(rows):
        at = f"{source} {where[i] if where else f'row {i + 1}'}"
        for column in needed:
            if column not in row:
                raise ConfigError(f"{at}: no '{column}' field (the first row has one); every example needs it")
        for column in (text, pair):
            if column in needed and not isinstance(row[column], str):
                raise ConfigError(f"{at}: '{column}' is {_kind(row[column])}, not a text")
        if task != "classification" or not label:
            continue
        value = row[label]
        if isinstance(value, str) and value.strip():
            kind = "string"
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            kind = "number"
        else:
            raise ConfigError(f"{at}: label {value!r} is {_kind(value) if value != '' else 'empty'}; "
                              f"expected a class number or name")
        label_kind = label_kind or kind
        if kind != label_kind:  # 1 and "1" would be two classes, and sorting them fails
            raise ConfigError(f"{at}: label {value!r} is a {kind}, but earlier labels are {label_kind}s; "
                              f"use one type for every label")
