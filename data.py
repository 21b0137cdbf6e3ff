"""Data: tokenize once and batch without waste (loading, from the Hub, a file or the offline fallback, is in
sources.py).

Classification: each sentence is tokenized once without padding; batches group sentences of similar
length and pad only to the longest in the batch (dynamic padding). Padding every sentence to 128 tokens,
as the seed course did, makes most of each batch padding: Rotten Tomatoes sentences average 21 words.

Causal LM: documents are tokenized, joined with an end-of-text token and cut into full blocks of
max_length tokens, so no position is padding and the loss is a real language-modelling loss.
(Padding each line to 512 and training on the pad tokens, as the seed did, makes "loss < 2.0" meaningless.)
"""

import math
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from config import COMPILE_PAD_MULTIPLE, ConfigError
from sources import load_splits


# ----------------------------------------------------------------------------- tokenizing

def check_max_length(model: torch.nn.Module, max_length: int) -> None:
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


def tokenize_classification(rows: List[dict], tokenizer: Any, columns: Tuple[str, Optional[str], str], max_length: int,
                            label_map: Optional[dict] = None) -> Tuple[List[dict], dict]:
    """(examples, label_map): one dict per example, input_ids, attention_mask (token_type_ids), labels. No padding
    here. label_map (label -> 0..n-1) is built from these rows unless given (evaluation reuses training's)."""
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


def tokenize_causal_lm(rows: List[dict], tokenizer: Any, text_column: str,
                       block_size: int) -> List[Dict[str, List[int]]]:
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

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = True, group_by_length: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.group_by_length, self.seed, self.rank, self.world_size = group_by_length, seed, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
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

    def __iter__(self) -> Iterator[List[int]]:
        yield from self._batches()[self.skip:]

    def __len__(self) -> int:
        return len(self._batches()) - self.skip


def make_loader(examples: List[dict], collate: Callable[[List[dict]], Dict[str, torch.Tensor]], batch_size: int,
                shuffle: bool, group_by_length: bool, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over LengthGroupedBatchSampler's batches (this rank's share), with its own seeded generator."""
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], batch_size, shuffle,
                                        group_by_length, seed, rank, world_size)
    # Its own generator: creating an iterator draws a seed, and drawing it from the global RNG would shift
    # the dropout masks of a resumed run away from those of an uninterrupted one.
    return torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed))


def collate_causal_lm(batch: List[dict]) -> Dict[str, torch.Tensor]:
    """Blocks are full, so labels are the input ids; the model shifts them by one position."""
    input_ids = torch.tensor([b["input_ids"] for b in batch])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def build_datasets(config: dict, tokenizer: Any, splits: Optional[tuple] = None) -> tuple:
    """(train_examples, eval_examples, collate, provenance, label_map); splits: what load_splits(config) returns,
    read here if not given."""
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
        # compile: lengths rounded up to a multiple, so the compiled step sees a few shapes, not one per batch
        collate = DataCollatorWithPadding(tokenizer, padding="max_length" if config["training"]["pad_to_max_length"]
                                          else "longest", max_length=max_length,
                                          pad_to_multiple_of=COMPILE_PAD_MULTIPLE if config["training"]["compile"]
                                          else None)
    else:
        train = tokenize_causal_lm(train_rows, tokenizer, columns[0], max_length)
        evaluation = tokenize_causal_lm(eval_rows, tokenizer, columns[0], max_length)
        collate, label_map = collate_causal_lm, None
    provenance.update(train_examples=len(train), eval_examples=len(evaluation))
    if label_map:
        sentiment = provenance.get("dataset") in ("rotten_tomatoes", "glue/sst2") and len(label_map) == 2
        provenance["label_names"] = ["negative", "positive"] if sentiment else [str(v) for v in label_map]
    return train, evaluation, collate, provenance, label_map
