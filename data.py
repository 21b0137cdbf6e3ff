"""Data: load (Hub, local files, or the offline fallback), tokenize once, and batch without waste.

Classification: each sentence is tokenized once without padding; batches group sentences of similar
length and pad only to the longest in the batch (dynamic padding). Padding every sentence to 128 tokens,
as the seed course did, makes most of each batch padding: Rotten Tomatoes sentences average 21 words.

Causal LM: documents are tokenized, joined with an end-of-text token and cut into full blocks of
max_length tokens, so no position is padding and the loss is a real language-modelling loss.
(Padding each line to 512 and training on the pad tokens, as the seed did, makes "loss < 2.0" meaningless.)
"""

import csv
import io
import json
import math
import os
import random

import torch

import assets
import utils
from utils import ConfigError, banner, hub_reachable


# ----------------------------------------------------------------------------- loading

def load_splits(config):
    """(train_rows, eval_rows, provenance, columns): lists of dicts plus where they came from."""
    data, task, seed = config["data"], config["task"], config["training"]["seed"]
    if data["train_file"]:
        columns = (data["text_column"], data["text_pair_column"], data["label_column"])
        train, validation = _read_local(data["train_file"], columns, task), None
        if data["validation_file"]:
            validation = _read_local(data["validation_file"], columns, task)
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


def _read_local(path, columns, task):
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
    if hub_reachable() or _in_datasets_cache(name):
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
    reason = reason or utils.OFFLINE_REASON
    banner([f"OFFLINE FALLBACK: dataset '{label}' replaced by {fallback}",
            f"why: {reason}",
            f"from: {assets.PROVENANCE[fallback]}",
            f"split: seeded {data['validation_fraction']:.0%} validation (seed {config['training']['seed']})"])
    loader = assets.rotten_tomatoes if fallback == "rotten_tomatoes" else assets.english_text
    train, validation = loader(seed=config["training"]["seed"], validation_fraction=data["validation_fraction"])
    columns = ("sentence", None, "label") if fallback == "rotten_tomatoes" else ("text", None, None)
    return train, validation, {"source": assets.PROVENANCE[fallback], "dataset": fallback, "requested": label,
                               "fallback": True, "reason": reason}, columns


def _in_datasets_cache(name):
    from datasets import config as datasets_config
    cache = datasets_config.HF_DATASETS_CACHE
    return os.path.isdir(cache) and any(name.replace("/", "___") in d for d in os.listdir(cache))


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


# ----------------------------------------------------------------------------- tokenizing

def check_max_length(model, max_length):
    """Refuse a max_length beyond the positions a model with learned position embeddings has: a longer text
    would otherwise crash mid-run ("size of tensor a (702) must match ... (512)"). Rotary models have no
    such table and are not limited here."""
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, k, None) for k in ("rope_theta", "rope_scaling", "rope_parameters")):
        return
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod",
                             "roberta-prelayernorm") and isinstance(getattr(config, "pad_token_id", None), int):
        limit -= config.pad_token_id + 1  # positions are counted from padding_idx + 1
    if max_length > limit:
        raise ConfigError(f"max_length {max_length} exceeds the {limit} positions of this {config.model_type} model; "
                          f"a longer text would crash mid-run. Set max_length <= {limit}")


def tokenize_classification(rows, tokenizer, columns, max_length, label_map=None):
    """One dict per example: input_ids, attention_mask (token_type_ids), labels. No padding here."""
    text, pair, label = columns
    encoded = tokenizer([str(r[text]) for r in rows], [str(r[pair]) for r in rows] if pair else None,
                        truncation=True, max_length=max_length)
    labels = [r[label] for r in rows]
    if all(isinstance(v, str) and v.strip().lstrip("-").isdigit() for v in labels):  # csv cells: "0", "-1"
        labels = [int(v) for v in labels]
    if label_map is None:  # labels 0..n-1 stay as they are (GLUE); anything else becomes 0..n-1 in sorted order
        values = sorted(set(labels))
        label_map = {v: i for i, v in enumerate(values)}
    unknown = set(labels) - set(label_map)
    if unknown:
        raise ConfigError(f"validation labels {sorted(unknown)[:5]} never occur in training")
    keys = list(encoded.keys())
    examples = [{k: encoded[k][i] for k in keys} | {"labels": label_map[labels[i]]} for i in range(len(rows))]
    return examples, label_map


def tokenize_causal_lm(rows, tokenizer, text_column, block_size):
    """Join documents (skipping empty lines) with the EOS token and cut into full blocks."""
    eos = tokenizer.eos_token_id
    ids = []
    texts = [str(r[text_column]) for r in rows if str(r[text_column]).strip()]
    for tokens in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(tokens + ([eos] if eos is not None else []))
    blocks = len(ids) // block_size
    if blocks == 0:
        raise ConfigError(f"only {len(ids)} tokens of text, fewer than one block of max_length={block_size}; "
                          f"lower max_length or add data")
    return [{"input_ids": ids[i * block_size:(i + 1) * block_size]} for i in range(blocks)]


# ----------------------------------------------------------------------------- batching

class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of similar-length examples, the same on every rank; rank r takes batches r::world.

    Examples are shuffled, cut into mega-batches of 50 batches, each sorted by length and cut into batches,
    then the batches are shuffled: batches stay random while padding within each batch stays small.
    """

    def __init__(self, lengths, batch_size, shuffle=True, group_by_length=True, seed=0, rank=0, world_size=1):
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.group_by_length, self.seed, self.rank, self.world_size = group_by_length, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        """Choose the epoch's order; skip_batches resumes in the middle of an epoch."""
        self.epoch, self.skip = epoch, skip_batches

    def _batches(self):
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            mega = self.batch_size * 50
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s:s + mega], key=lambda i: -self.lengths[i])]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        if self.world_size > 1:
            if self.shuffle:  # training: equal batch counts on every rank keep DDP's all-reduces in step
                per_rank = math.ceil(len(batches) / self.world_size)
                batches = (batches * 2)[:per_rank * self.world_size]
            batches = batches[self.rank::self.world_size]  # evaluation: each example exactly once
        return batches

    def __iter__(self):
        yield from self._batches()[self.skip:]

    def __len__(self):
        return len(self._batches()) - self.skip


def make_loader(examples, collate, batch_size, shuffle, group_by_length, seed, rank=0, world_size=1, num_workers=0):
    key = "input_ids"
    sampler = LengthGroupedBatchSampler([len(e[key]) for e in examples], batch_size, shuffle,
                                        group_by_length, seed, rank, world_size)
    # Its own generator: creating an iterator draws a seed, and drawing it from the global RNG would shift
    # the dropout masks of a resumed run away from those of an uninterrupted one.
    return torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed))


def collate_causal_lm(batch):
    """Blocks are full, so labels are the input ids; the model shifts them by one position."""
    input_ids = torch.tensor([b["input_ids"] for b in batch])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def build_datasets(config, tokenizer, splits=None):
    """(train_examples, eval_examples, collate, provenance, label_map); splits: load_splits(config) if given."""
    train_rows, eval_rows, provenance, columns = splits or load_splits(config)
    max_length = config["training"]["max_length"]
    if config["task"] == "classification":
        from transformers import DataCollatorWithPadding
        train, label_map = tokenize_classification(train_rows, tokenizer, columns, max_length)
        if len(label_map) != config["num_labels"]:
            raise ConfigError(f"the data has {len(label_map)} labels {list(label_map)[:10]} but num_labels is "
                              f"{config['num_labels']}; set num_labels: {len(label_map)}")
        evaluation, _ = tokenize_classification(eval_rows, tokenizer, columns, max_length, label_map)
        # pad_to_max_length reproduces the seed course (every batch max_length long) for comparison
        collate = DataCollatorWithPadding(tokenizer, padding="max_length" if config["training"]["pad_to_max_length"]
                                          else "longest", max_length=max_length)
    else:
        train = tokenize_causal_lm(train_rows, tokenizer, columns[0], max_length)
        evaluation = tokenize_causal_lm(eval_rows, tokenizer, columns[0], max_length)
        collate, label_map = collate_causal_lm, None
    provenance.update(train_examples=len(train), eval_examples=len(evaluation))
    if label_map:
        sentiment = provenance.get("dataset") in ("rotten_tomatoes", "glue/sst2") and len(label_map) == 2
        provenance["label_names"] = ["negative", "positive"] if sentiment else [str(v) for v in label_map]
    return train, evaluation, collate, provenance, label_map
