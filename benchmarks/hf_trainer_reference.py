"""
The reference a user would reach for instead: Hugging Face Trainer + PEFT LoRA, same model, data and
hyperparameters as `python train_lora_basic.py` (MiniLM fallback, Rotten Tomatoes 90/10 split, r=8,
alpha 16, dropout 0.05, query+value, batch 16, warmup 0.1, weight decay 0.01, dynamic padding, fp32).
With --task causal_lm: the GPT-2 track's offline setup instead (SmolLM2-135M on the English text cut into
blocks of --block_size tokens, r=8, alpha 16, q_proj+v_proj, batch 8, lr 2e-4).
Benchmark-only dependencies: peft and accelerate.

    python benchmarks/hf_trainer_reference.py --epochs 1 --output_dir /tmp/trainer_ref
    python benchmarks/hf_trainer_reference.py --task causal_lm --max_steps 6 --precision bf16 --output_dir /tmp/ref
Writes training_metrics.json with train_time_s, the best metric and peak RSS, like the main script (through
harness.write_results: with the command, commit, machine and versions).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import write_results  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="bf16/fp16: a GPU")
    parser.add_argument("--device", default="auto", help="auto uses the GPU where there is one, like Trainer")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--task", default="classification", choices=["classification", "causal_lm"])
    parser.add_argument("--block_size", type=int, default=512, help="causal_lm: tokens per training block")
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--train_file", help="classification: a .csv with sentence,label instead of the bundled split")
    parser.add_argument("--validation_file", help="classification: the .csv to evaluate on, with --train_file")
    args = parser.parse_args()
    if args.task == "causal_lm":
        return causal_lm(args)

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    import assets
    from data import tokenize_classification
    from sources import read_local_file

    torch.manual_seed(args.seed)
    folder = assets.model_dir("minilm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    columns = ("sentence", None, "label")
    if args.train_file:  # the SST-2-sized epoch of bench.py: the same files, read as this repo's run reads them
        train_rows, eval_rows = (read_local_file(path, columns, "classification")
                                 for path in (args.train_file, args.validation_file))
    else:
        train_rows, eval_rows = assets.rotten_tomatoes(seed=args.seed)
    train_rows, eval_rows = train_rows[:args.max_train_samples], eval_rows[:args.max_eval_samples]
    train, label_map = tokenize_classification(train_rows, tokenizer, columns, 128)
    evaluation, _ = tokenize_classification(eval_rows, tokenizer, columns, 128, label_map)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"],
                                             task_type="SEQ_CLS"))

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    steps = -(-len(train) // 16) * args.epochs
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, learning_rate=args.lr, warmup_steps=int(0.1 * steps), weight_decay=0.01,
        max_grad_norm=1.0, lr_scheduler_type="linear", eval_strategy="epoch", save_strategy="no",
        logging_steps=20, seed=args.seed, report_to=[], use_cpu=use_cpu(args),
        bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=Dataset.from_list(train),
                      eval_dataset=Dataset.from_list(evaluation), data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=accuracy)
    start = time.time()
    trainer.train()
    train_time = time.time() - start
    evals = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h]
    eval_time = sum(h.get("eval_runtime", 0.0) for h in trainer.state.log_history)
    metrics = {"train_time_s": round(train_time - eval_time, 2), "wall_time_s": round(train_time, 2),
               "best": {"metric_name": "accuracy", "value": max(evals)}, "eval_accuracy_per_epoch": evals}
    save_metrics(args, metrics)


def causal_lm(args):
    """The GPT-2 track offline, through Trainer + PEFT: same blocks, model, LoRA and schedule as this repo."""
    import math
    import resource

    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator
    import assets
    from data import tokenize_causal_lm

    torch.manual_seed(args.seed)
    folder = assets.model_dir("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train_rows, eval_rows = assets.english_text(seed=args.seed)
    train_rows, eval_rows = train_rows[:args.max_train_samples], eval_rows[:args.max_eval_samples]
    train = [dict(b, labels=b["input_ids"]) for b in tokenize_causal_lm(train_rows, tokenizer, "text", args.block_size)]
    evaluation = [dict(b, labels=b["input_ids"]) for b in tokenize_causal_lm(eval_rows, tokenizer, "text", args.block_size)]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # Trainer's way: fp32 master weights
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    steps = args.max_steps if args.max_steps > 0 else -(-len(train) // 8) * args.epochs
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=args.lr,
        warmup_steps=int(0.1 * steps), weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="linear",
        eval_strategy="no", save_strategy="no", logging_steps=10, seed=args.seed, report_to=[],
        use_cpu=use_cpu(args), bf16=args.precision == "bf16",
        fp16=args.precision == "fp16", dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=Dataset.from_list(train),
                      eval_dataset=Dataset.from_list(evaluation), data_collator=default_data_collator)
    start = time.time()
    trainer.train()
    train_time = time.time() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = {"train_time_s": round(train_time, 2), "steps": trainer.state.global_step,
               "best": {"metric_name": "perplexity", "value": math.exp(eval_loss)}, "eval_loss": eval_loss,
               "peak_memory_mb": round(peak_mb, 1), "peak_memory_kind": "process peak RSS"}
    save_metrics(args, metrics)


def use_cpu(args):
    """Trainer's device: the GPU where there is one, unless --device cpu."""
    import torch
    return args.device == "cpu" or not torch.cuda.is_available()


def save_metrics(args, metrics):
    """training_metrics.json in --output_dir, with the harness's header; printed as one JSON line."""
    import torch
    device = torch.device("cpu" if use_cpu(args) else "cuda")
    write_results(os.path.join(args.output_dir, "training_metrics.json"), metrics, seeds=[args.seed], device=device)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
