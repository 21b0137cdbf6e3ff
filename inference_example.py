"""
Use a trained LoRA adapter: classify sentences, or continue a prompt with a causal-LM adapter.

    python inference_example.py                                   # interactive, adapter in output/
    python inference_example.py --mode demo
    python inference_example.py --mode text --text "This is amazing!"
    python inference_example.py --mode text --text "..." --compare_base   # with and without the adapter
    python inference_example.py --mode text --text "..." --merge          # B A folded into W0 first
    python inference_example.py --adapter_dir results/gpt2_cpu --mode text --text "The history of" --max_new_tokens 40
    python inference_example.py --adapters sst=output other=results/rank_4 --mode demo   # several adapters

The base model named in adapter_config.json is resolved exactly as in training (local folder, Hub or its
cache, or the same model shipped as a pip package), then the adapter is applied with load_adapter.
"""

import argparse
import json
import os
import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from lora_linear import (ADAPTER_BIN_NAME, ADAPTER_WEIGHTS_NAME, HEAD_NAMES, AdapterError, load_adapter,
                         lora_disabled, merge_lora_weights, read_adapter, read_adapter_config)
from config import ConfigError
from precision import pick_device
from sources import load_base_model

DEMO_SENTENCES = [  # clearly positive, clearly negative, and mixed
    ("positive", "A warm, funny and beautifully acted film that I would happily watch again."),
    ("positive", "One of the most moving stories of the year, with a superb cast."),
    ("negative", "A dull, lifeless mess with a plot that makes no sense."),
    ("negative", "The jokes fall flat and the two hours feel like four."),
    ("mixed", "The acting is wonderful, but the script is painfully thin."),
    ("mixed", "Not a great movie, though it has a few charming moments."),
]
DEMO_PROMPTS = ["The history of the city", "In the morning, the committee", "Scientists have found that"]


def read_label_names(adapter_dir: str, num_labels: int) -> List[str]:
    """Label names from the run's training_metrics.json, else negative/positive for two classes."""
    for folder in (adapter_dir, os.path.dirname(os.path.abspath(adapter_dir))):
        path = os.path.join(folder, "training_metrics.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    names = json.load(f).get("label_names")
                if names and len(names) == num_labels:
                    return names
            except (ValueError, OSError, AttributeError):  # bad JSON or UTF-8, unreadable, not an object
                pass
    return ["negative", "positive"] if num_labels == 2 else [f"label_{i}" for i in range(num_labels)]


# a sequence classifier's last layer (RoBERTa's head ends in classifier.out_proj): its rows are the labels
HEAD_KEYS = tuple(f"{name}.weight" for name in HEAD_NAMES) + ("classifier.out_proj.weight",)
TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}  # what load_base_model can build


def num_labels_of(adapter_dir: str) -> int:
    """The classification head's output size, read from the adapter's safetensors header (or its older .bin)."""
    path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    try:
        if os.path.isfile(path):
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        else:
            path = os.path.join(adapter_dir, ADAPTER_BIN_NAME)
            shapes = {key: list(t.shape) for key, t in read_adapter(adapter_dir)[1].items()}
    except AdapterError:
        raise
    except Exception as e:
        raise AdapterError(f"{path} is truncated or corrupt ({type(e).__name__}); re-save the adapter") from None
    for key, shape in shapes.items():
        if ("." + key).endswith(tuple("." + head for head in HEAD_KEYS)):  # not pre_classifier.weight
            return shape[0]
    return 2


def task_of(config: dict, adapter_dir: str) -> str:
    """classification or causal_lm from the adapter's task_type (PEFT's names)."""
    task_type = config.get("task_type")
    if task_type is None:
        return "causal_lm"  # PEFT's default task: a bare model, served here as a language model
    if task_type not in TASKS:
        raise AdapterError(f"{adapter_dir}: task_type {task_type!r} is not served by this script "
                           f"(it runs {', '.join(TASKS)})")
    return TASKS[task_type]


def load_base(base: str, task: str, num_labels: int) -> Tuple[torch.nn.Module, Any, dict]:
    """load_base_model for the base an adapter names; a name that is not a loadable model is an AdapterError."""
    try:
        return load_base_model(base, task, num_labels)
    except ConfigError as e:
        raise AdapterError(f"the base model named in adapter_config.json: {e}") from None


def load_for_inference(adapter_dir: str, device: torch.device,
                       merge: bool = False) -> Tuple[torch.nn.Module, Any, str, dict]:
    """(model, tokenizer, task, adapter_config): the shared base-model resolution, then load_adapter."""
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"adapter folder '{adapter_dir}' does not exist; train one first "
                           f"(python train_lora_basic.py) or pass --adapter_dir")
    config = read_adapter_config(adapter_dir)
    task = task_of(config, adapter_dir)
    base = config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path")
    num_labels = num_labels_of(adapter_dir) if task == "classification" else 2
    model, tokenizer, provenance = load_base(base, task, num_labels)
    load_adapter(model, adapter_dir)
    if merge:
        merge_lora_weights(model)
    model.to(device).eval()
    print(f"base model: {provenance['used']} [{provenance['source']}]; adapter: {adapter_dir} "
          f"(r={config['r']}, alpha={config['lora_alpha']}, {'merged' if merge else 'unmerged'})", file=sys.stderr)
    return model, tokenizer, task, config


class Predictor:
    """One loaded adapter (and its base model) with the task's way of answering."""

    def __init__(self, adapter_dir: str, device: torch.device, args: argparse.Namespace) -> None:
        self.model, self.tokenizer, self.task, self.config = load_for_inference(adapter_dir, device, args.merge)
        self.device, self.args = device, args
        self.labels = read_label_names(adapter_dir, self.model.config.num_labels) if self.task == "classification" \
            else None

    def base_only(self) -> AbstractContextManager:
        """A context in which the model runs without the adapter (unmerged models only)."""
        return lora_disabled(self.model)

    @torch.no_grad()
    def classify(self, texts: List[str]) -> List[Tuple[str, float]]:
        """(label, probability) for each text, in one padded batch."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt").to(self.device)
        probs = self.model(**batch).logits.float().softmax(-1)
        return [(self.labels[i], p[i].item()) for p, i in zip(probs, probs.argmax(-1).tolist())]

    @torch.no_grad()
    def generate(self, prompt: str) -> str:
        """The continuation of `prompt` (sampled with --temperature, --top_p and --seed; greedy at temperature 0)."""
        torch.manual_seed(self.args.seed)
        batch = self.tokenizer(prompt, return_tensors="pt").to(self.device)
        sample = self.args.temperature > 0
        out = self.model.generate(**batch, max_new_tokens=self.args.max_new_tokens, do_sample=sample,
                                  temperature=self.args.temperature if sample else None,
                                  top_p=self.args.top_p if sample else None,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def answer(self, text: str) -> List[str]:
        """Printable lines for one input, with the base model's answer beside it if asked."""
        runs = [("adapter", nullcontext())] + ([("no LoRA", self.base_only())] if self.args.compare_base else [])
        lines = []
        for name, context in runs:
            with context:
                if self.task == "classification":
                    label, confidence = self.classify([text])[0]
                    lines.append(f"  {name:<9}{label:<10} confidence {confidence:.3f}")
                else:
                    lines.append(f"  {name:<9}{text}|{self.generate(text)}")
        return lines


class MultiPredictor(Predictor):
    """Several adapters on one base model (multi_lora): 'name: text' picks one; demo mixes them in a batch."""

    def __init__(self, named_dirs: Dict[str, str], device: torch.device, args: argparse.Namespace) -> None:
        from multi_lora import MultiAdapterModel
        configs = {name: read_adapter_config(folder) for name, folder in named_dirs.items()}
        bases = {c.get("base_model_name_or_path") for c in configs.values()}
        tasks = {c.get("task_type") for c in configs.values()}
        if len(bases) != 1 or len(tasks) != 1:
            raise ConfigError(f"--adapters must share one base model and task; got {sorted(map(str, bases))} "
                              f"and {sorted(map(str, tasks))}")
        first = next(iter(named_dirs.values()))
        self.task = task_of(configs[next(iter(named_dirs))], first)
        num_labels = num_labels_of(first) if self.task == "classification" else 2
        base = bases.pop()
        if not base:
            raise AdapterError(f"{first}/adapter_config.json names no base_model_name_or_path")
        model, self.tokenizer, provenance = load_base(base, self.task, num_labels)
        self.multi = MultiAdapterModel(model.to(device), base_model_name_or_path=base)
        for name, folder in named_dirs.items():
            self.multi.load_adapter(name, folder)
        self.model, self.device, self.args = self.multi.model, device, args
        self.labels = read_label_names(first, num_labels) if self.task == "classification" else None
        self.multi.set_adapter(self.multi.adapters[0])
        print(f"base model: {provenance['used']} [{provenance['source']}]; adapters: "
              f"{', '.join(self.multi.adapters)} (type 'name: text' to choose; default {self.multi.adapters[0]})",
              file=sys.stderr)

    @contextmanager
    def base_only(self) -> Iterator[None]:
        """The base model alone inside this block; the adapter that was active comes back after it."""
        active = self.multi.active_adapter
        self.multi.set_adapter(None)
        try:
            yield
        finally:
            self.multi.set_adapter(active)

    def answer(self, text: str) -> List[str]:
        """Predictor.answer, each line tagged with the adapter that gave it. 'name: text' switches to adapter `name`
        (for later inputs too); 'base: text' asks the base model alone."""
        name, sep, rest = text.partition(":")
        if sep and name.strip() in self.multi.adapters:
            self.multi.set_adapter(name.strip())
            text = rest.strip()
        elif sep and name.strip() == "base":
            with self.base_only():
                return [f"  (base)   {line.strip()}" for line in super().answer(rest.strip())]
        active = self.multi.active_adapter
        return [f"  ({'base' if 'no LoRA' in line else active}) {line.strip().replace('no LoRA', 'base model')}"
                for line in super().answer(text)]

    def demo(self) -> None:
        """One forward pass over a mixed batch: row i uses adapter i mod n (and the base model last)."""
        names = self.multi.adapters + [None]
        if self.task == "classification":
            texts = [s for _, s in DEMO_SENTENCES]
            choice = [names[i % len(names)] for i in range(len(texts))]
            with self.multi.rows(choice):
                results = self.classify(texts)
            print(f"{'adapter':<10}{'predicted':<11}{'conf':>6}  sentence   (one mixed batch)")
            for name, text, (label, conf) in zip(choice, texts, results):
                print(f"{name or 'base':<10}{label:<11}{conf:>6.3f}  {text}")
        else:
            self.tokenizer.padding_side = "left"  # generation continues from the right edge
            choice = [names[i % len(names)] for i in range(len(DEMO_PROMPTS))]
            batch = self.tokenizer(DEMO_PROMPTS, return_tensors="pt", padding=True).to(self.device)
            torch.manual_seed(self.args.seed)
            with self.multi.rows(choice), torch.no_grad():
                out = self.model.generate(**batch, max_new_tokens=self.args.max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            for name, prompt, row in zip(choice, DEMO_PROMPTS, out):
                completion = self.tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
                print(f"({name or 'base'}) {prompt}|{completion}")


def run_demo(predictor: Predictor) -> None:
    """--mode demo: the demo sentences (or prompts), with the base model's answers beside them if --compare_base."""
    if isinstance(predictor, MultiPredictor):
        return predictor.demo()
    if predictor.task == "classification":
        results = predictor.classify([s for _, s in DEMO_SENTENCES])
        base = None
        if predictor.args.compare_base:
            with predictor.base_only():
                base = predictor.classify([s for _, s in DEMO_SENTENCES])
        print(f"{'expected':<10}{'predicted':<11}{'conf':>6}  " + (f"{'no LoRA':<16}" if base else "") + "sentence")
        for i, ((expected, sentence), (label, conf)) in enumerate(zip(DEMO_SENTENCES, results)):
            extra = f"{base[i][0]:<9} {base[i][1]:.2f}  " if base else ""
            print(f"{expected:<10}{label:<11}{conf:>6.3f}  {extra}{sentence}")
    else:
        for prompt in DEMO_PROMPTS:
            print(f"> {prompt}")
            print("\n".join(predictor.answer(prompt)))


def run_interactive(predictor: Predictor) -> None:
    """--mode interactive: answer each typed line until quit, exit, Ctrl-D or Ctrl-C."""
    kind = "a sentence to classify" if predictor.task == "classification" else "a prompt to continue"
    print(f"Type {kind}; 'quit', 'exit', Ctrl-D or Ctrl-C to leave.")
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text.lower() in ("quit", "exit"):
            return
        if not text:
            print(f"  (empty input: type {kind}, or 'quit')")
            continue
        print("\n".join(predictor.answer(text)))


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the flags, load the adapter(s), run the mode: exit status 0, or 2 (one line) for a bad flag or adapter."""
    parser = argparse.ArgumentParser(description="Run a trained LoRA adapter.")
    parser.add_argument("--mode", choices=("interactive", "demo", "text"), default="interactive")
    parser.add_argument("--text", default=None, help="input for --mode text")
    parser.add_argument("--adapter_dir", default="output")
    parser.add_argument("--merge", action="store_true", help="fold B A into the base weights first")
    parser.add_argument("--compare_base", action="store_true", help="also show the base model's answer")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--adapters", nargs="+", metavar="NAME=DIR", default=None,
                        help="serve several adapters of one base model at once (multi_lora)")
    args = parser.parse_args(argv)
    try:
        if args.mode == "text" and not args.text:
            raise ConfigError("--mode text needs --text \"your sentence\"")
        if args.merge and args.compare_base:
            raise ConfigError("--compare_base needs the adapter unmerged; drop --merge")
        if args.adapters:
            pairs = [pair.split("=", 1) for pair in args.adapters if "=" in pair]
            if len(pairs) != len(args.adapters) or not all(name.strip() and folder for name, folder in pairs):
                raise ConfigError("--adapters takes NAME=DIR pairs, e.g. --adapters sst=output lm=results/gpt2_cpu")
            named = dict(pairs)
            if len(named) != len(pairs):
                raise ConfigError("--adapters names each adapter once; pick distinct names")
            if args.merge:
                raise ConfigError("--merge cannot serve several adapters; drop --merge")
            for folder in named.values():
                if not os.path.isdir(folder):
                    raise AdapterError(f"adapter folder '{folder}' does not exist")
            predictor = MultiPredictor(named, pick_device(args.device), args)
        else:
            predictor = Predictor(args.adapter_dir, pick_device(args.device), args)
    except (ConfigError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.mode == "text":
        print(f"> {args.text}")
        print("\n".join(predictor.answer(args.text)))
    elif args.mode == "demo":
        run_demo(predictor)
    else:
        run_interactive(predictor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
