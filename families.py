"""Model families: what a checkpoint is, so that the model decides the track.

One table says, for each supported architecture, which task it is fine-tuned for here and which module is its
output head; one more says, for each task, the track's config file and the offline assets of the same kind.
The LoRA targets themselves (W_q, W_v by their generic role names, GPT-2's fused c_attn) live in
lora_linear.py, next to the surgery that uses them.

A checkpoint's family comes from its own config.json (model_type and architectures), read from a local
folder, the Hugging Face cache or the Hub. Only when none of them can be read (offline, never downloaded)
is the family guessed from the name, and the guess is said in the log.
"""

import json
import os
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Family:
    task: str  # classification | causal_lm: what train_lora_basic.py fine-tunes this family for by default
    head: str  # the output module: new and trained for classification, frozen and tied for a causal LM


FAMILIES = {
    "bert": Family("classification", "classifier"),
    "roberta": Family("classification", "classifier"),
    "xlm-roberta": Family("classification", "classifier"),
    "electra": Family("classification", "classifier"),
    "distilbert": Family("classification", "classifier"),
    "gpt2": Family("causal_lm", "lm_head"),
    "llama": Family("causal_lm", "lm_head"),
    "mistral": Family("causal_lm", "lm_head"),
    "qwen2": Family("causal_lm", "lm_head"),
}


@dataclass(frozen=True)
class Track:
    config: str  # the track's YAML: its values are the defaults under the user's file and flags
    offline_model: str  # the pip-shipped asset of the same kind, used when the Hub is out of reach
    offline_dataset: str
    metric: str  # what evaluation reports and "best" means


TRACKS = {
    "classification": Track("config.yaml", "minilm", "rotten_tomatoes", "accuracy"),
    "causal_lm": Track("configs/gpt2_wikitext.yaml", "smollm2", "english_text", "perplexity"),
}
# The offline assets by the model family they belong to (see assets.py).
ASSET_TASKS = {"minilm": "classification", "smollm2": "causal_lm"}


def is_path_like(name: str) -> bool:
    """A local path rather than a Hub id ('user/model' is an id; './x', '/x', '~/x', 'a/b/c' are paths)."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def task_from_config(config: dict) -> Optional[str]:
    """classification | causal_lm from a config.json: its architectures first, then its model_type."""
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") and "With" not in a for a in architectures):
        return "causal_lm"  # GPT2LMHeadModel, LlamaForCausalLM (not T5WithLMHeadModel, an encoder-decoder)
    if any(a.endswith(("ForSequenceClassification", "ForMaskedLM", "ForPreTraining")) for a in architectures):
        return "classification"  # an encoder: fine-tuned here with a new classification head
    family = FAMILIES.get(config.get("model_type"))
    return family.task if family else None


def read_model_config(model_name: str) -> Optional[dict]:
    """The checkpoint's config.json from a local folder, the Hugging Face cache, or the Hub; None if none."""
    from sources import hub_reachable
    if model_name in ASSET_TASKS:
        return {"model_type": "bert" if model_name == "minilm" else "llama"}
    path = None
    if os.path.isdir(model_name):
        path = os.path.join(model_name, "config.json")
    elif not is_path_like(model_name):
        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache
            cached = try_to_load_from_cache(model_name, "config.json")
            path = cached if isinstance(cached, str) else (
                hf_hub_download(model_name, "config.json") if hub_reachable() else None)
        except Exception:  # not a valid repo id, not on the Hub, no permission: the caller decides
            path = None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def detect_task(model_name: str) -> tuple:
    """(task or None, how it was decided) for a model name or folder."""
    config = read_model_config(model_name)
    if config is not None:
        task = task_from_config(config)
        return task, (f"its config (model_type {config.get('model_type')!r})" if task else
                      f"unknown: its config (model_type {config.get('model_type')!r}) names no known architecture")
    guess = next((FAMILIES[t].task for t in sorted(FAMILIES, key=len, reverse=True)
                  if t in os.path.basename(model_name.rstrip("/")).lower()), None)
    if guess:
        return guess, "its name (its config could not be read: offline and not in the cache)"
    return None, "unknown"


def is_encoder(model_name: str) -> bool:
    """True when the checkpoint's own config names an encoder family (BERT, RoBERTa, ...): every position sees the
    whole text, so it cannot learn next-token prediction. A decoder fine-tuned as a classifier is not one."""
    config = read_model_config(model_name)
    family = FAMILIES.get(config.get("model_type")) if config else None
    return family is not None and family.task == "classification"


def track_config_path(task: str) -> str:
    return os.path.join(ROOT, TRACKS[task].config)
