"""
Speed and memory of this repo's LoRA against what users would pick instead. One command:

    python benchmarks/bench.py                 # everything below, then a table (several minutes on 2 cores)
    python benchmarks/bench.py --only step     # a subset of: step inference memory padding multi e2e precision
                                               #              profile compile causal (and, only on request,
                                               #              tests: the test suite's wall time, and sst2_epoch:
                                               #              one SST-2-sized epoch, for a GPU)
    python benchmarks/bench.py --device cuda   # on the GPU (adds a larger step shape and the auto precision runs)
    python benchmarks/bench.py --quick         # tiny model, a smoke test (used by the tests)

Contenders run side by side in one process, alternating, after warm-up; each number is a median.
Memory is measured in separate processes (peak RSS on CPU, max allocated on CUDA).
Results are printed as a markdown table and written to benchmarks/results.json (harness.write_results: with the
command, commit, machine and versions). Timing, memory and the results file: benchmarks/harness.py.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from harness import command_line, machine, measure_in_child, peak_memory_during, timed_rounds  # noqa: E402
from harness import write_results  # noqa: E402
from lora_linear import apply_lora_to_model, lora_layers, mark_only_lora_as_trainable, merge_and_unload  # noqa: E402
from lora_linear import merge_lora_weights  # noqa: E402
from precision import autocast_context, cpu_has_native_bf16, pick_device  # noqa: E402
from report import library_versions  # noqa: E402
from precision import resolve_precision  # noqa: E402

HF_REFERENCE = os.path.join("benchmarks", "hf_trainer_reference.py")
ROWS = []  # (section, contender, value, unit, ratio text)


def record(section, name, value, unit, ratio=""):
    ROWS.append((section, name, value, unit, ratio))
    print(f"  {section:<10}{name:<44}{value:>10.4g} {unit:<10}{ratio}", flush=True)


def bert_base(quick, device):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(num_labels=2) if not quick else BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                                   num_attention_heads=4, intermediate_size=128)
    return BertForSequenceClassification(config).to(device)


def make_step(model, batch, precision, device):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        with autocast_context(precision, device):
            loss = model(**batch).loss
        loss.backward()
        if optimizer:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return step


def section_step(args, device):
    """Training step at bert-base dimensions, B=8, S=128; on a GPU also B=64, S=256, where the GPU is busy
    enough for precision to matter (at B=8 it mostly waits for Python to launch kernels)."""
    shapes = [(8, 128)] if not args.quick else [(2, 16)]
    if device.type == "cuda" and not args.quick:
        shapes.append((64, 256))
    for B, S in shapes:
        medians, auto = _step(args, device, B, S, prefix="" if (B, S) == shapes[0] else f"B={B} S={S}: ")
    _bf16_matmul_note(args, device, auto)
    return medians


def _step(args, device, B, S, prefix):
    print(f"training step (bert-base dims, batch {B}, seq {S})")
    vocab = 30522 if not args.quick else 1000
    batch = {"input_ids": torch.randint(0, vocab, (B, S), device=device),
             "labels": torch.randint(0, 2, (B,), device=device)}
    auto = resolve_precision("auto", device)
    contenders = {}

    floor = bert_base(args.quick, device).train()
    for p in floor.parameters():
        p.requires_grad = False
    floor.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())  # grads flow everywhere
    contenders["floor: all frozen, grads through every layer"] = make_step(floor, batch, "fp32", device)

    ours = bert_base(args.quick, device).train()
    mark_only_lora_as_trainable(apply_lora_to_model(ours, ["query", "value"], rank=8, alpha=16))
    contenders["this repo LoRA r=8 q,v (fp32)"] = make_step(ours, batch, "fp32", device)
    if auto != "fp32":
        contenders[f"this repo LoRA r=8 q,v (auto = {auto})"] = make_step(ours, batch, auto, device)
    try:
        import peft
        peft_model = peft.get_peft_model(bert_base(args.quick, device).train(),
                                         peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                         task_type="SEQ_CLS"))
        contenders["PEFT LoRA r=8 q,v (fp32)"] = make_step(peft_model, batch, "fp32", device)
    except ImportError:
        print("  (peft not installed: skipping the PEFT contender)")
    full = bert_base(args.quick, device).train()
    contenders["full fine-tuning (fp32)"] = make_step(full, batch, "fp32", device)
    medians = timed_rounds(contenders, args.rounds, 2, device)
    base = medians["floor: all frozen, grads through every layer"]
    for name, t in medians.items():
        record("step", prefix + name, t * 1000, "ms", f"{t / base:.2f}x floor")
    del floor, ours, full, contenders
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return medians, auto


def _bf16_matmul_note(args, device, auto):
    if device.type == "cpu" and auto == "fp32":
        # Why auto stays fp32 here: without native bf16 a bf16 matrix product is emulated. One bert-base
        # sized product (1024 x 768 @ 768 x 768) shows it; a whole bf16 step would take minutes.
        x, w = torch.randn(1024, 768), torch.randn(768, 768)
        xb, wb = x.bfloat16(), w.bfloat16()
        mm = timed_rounds({"fp32": lambda: x @ w, "bf16": lambda: xb @ wb}, 5 if not args.quick else 1, 1, device)
        record("step", "one 1024x768x768 matmul, fp32", mm["fp32"] * 1000, "ms", "1.00x")
        record("step", "one 1024x768x768 matmul, bf16 (emulated here)", mm["bf16"] * 1000, "ms",
               f"{mm['bf16'] / mm['fp32']:.1f}x fp32")


def section_inference(args, device):
    print("inference latency (bert-base dims, batch 8, seq 128, no grad)")
    B, S = (8, 128) if not args.quick else (2, 16)
    vocab = 30522 if not args.quick else 1000
    ids = torch.randint(0, vocab, (B, S), device=device)
    base = bert_base(args.quick, device).eval()
    unmerged = bert_base(args.quick, device).eval()
    apply_lora_to_model(unmerged, ["query", "value"], rank=8, alpha=16)
    for _, layer in lora_layers(unmerged):
        torch.nn.init.normal_(layer.lora.lora_B, std=0.01)
    merged = bert_base(args.quick, device).eval()
    apply_lora_to_model(merged, ["query", "value"], rank=8, alpha=16)
    merged.load_state_dict(unmerged.state_dict())
    merge_lora_weights(merged)
    unloaded = bert_base(args.quick, device).eval()
    apply_lora_to_model(unloaded, ["query", "value"], rank=8, alpha=16)
    unloaded.load_state_dict(unmerged.state_dict())
    merge_and_unload(unloaded)  # plain nn.Linear layers again: no wrapper call left in the forward

    def run(model):
        def call():
            with torch.no_grad():
                model(input_ids=ids)
        return call
    medians = timed_rounds({"base model": run(base), "LoRA unmerged": run(unmerged), "LoRA merged": run(merged),
                            "LoRA merged and unloaded": run(unloaded)}, args.rounds * 2, 3, device)
    for name, t in medians.items():
        record("inference", name, t * 1000, "ms", f"{t / medians['base model']:.3f}x base")
    return medians


def memory_child(mode: str, quick: bool, shape: list, device: str) -> dict:
    """One setup's peak training memory, run by harness.measure_in_child in a process of its own."""
    device = pick_device(device)
    model = bert_base(quick, device).train()
    if mode != "full":
        mark_only_lora_as_trainable(apply_lora_to_model(model, ["query", "value"], rank=8, alpha=16))
    if mode == "lora+checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    B, S = shape
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (B, S), device=device),
             "labels": torch.randint(0, 2, (B,), device=device)}
    step = make_step(model, batch, "fp32", device)
    return {"peak_mb": peak_memory_during(lambda: [step() for _ in range(2)], device)}


def section_memory(args, device):
    print("peak training memory (separate processes; bert-base dims, fp32; CPU: peak RSS sampled during 2 steps)")
    results = {}
    shapes = [(8, 128), (32, 128)] if not args.quick else [(2, 16)]
    for shape in shapes:
        for mode in ("full", "lora", "lora+checkpointing"):
            results[(mode, shape)] = measure_in_child("benchmarks/bench.py:memory_child", mode=mode, quick=args.quick,
                                                      shape=list(shape), device=str(device))["peak_mb"]
        for mode in ("full", "lora", "lora+checkpointing"):
            ratio = results[("full", shape)] / results[(mode, shape)]
            record("memory", f"{mode}, batch {shape[0]} x {shape[1]}", results[(mode, shape)], "MB",
                   f"full/this = {ratio:.2f}x")
    return results


def section_padding(args, device):
    """Samples per second of LoRA training on the real sentences: dynamic padding + grouping vs padding to 128."""
    print("padding (MiniLM on the bundled Rotten Tomatoes sentences, batch 16, LoRA r=8 q,v)")
    import assets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    from data import make_loader, tokenize_classification
    folder = assets.model_dir("minilm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train, _ = assets.rotten_tomatoes()
    everything, _ = tokenize_classification(train, tokenizer, ("sentence", None, "label"), 128)
    examples = everything[:64 if args.quick else 640]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).to(device).train()
    mark_only_lora_as_trainable(apply_lora_to_model(model, ["query", "value"], rank=8, alpha=16))
    loaders = {
        "pad every batch to 128 (the seed)": make_loader(examples, DataCollatorWithPadding(
            tokenizer, padding="max_length", max_length=128), 16, True, False, 0),
        "dynamic padding, random batches": make_loader(examples, DataCollatorWithPadding(tokenizer), 16, True, False, 0),
        "dynamic padding, length-grouped (this repo)": make_loader(examples, DataCollatorWithPadding(tokenizer), 16,
                                                                   True, True, 0),
    }
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def epoch(loader):
        def run():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return run
    # an odd number of rounds: the median epoch time is one epoch's, and the median rate is its rate
    seconds = timed_rounds({name: epoch(loader) for name, loader in loaders.items()}, 3 if not args.quick else 1, 0,
                           device)
    medians = {name: len(examples) / t for name, t in seconds.items()}
    seed = medians["pad every batch to 128 (the seed)"]
    for name, rate in medians.items():
        record("padding", name, rate, "samples/s", f"{rate / seed:.2f}x the seed")
    # The work per epoch is set by the tokens computed, padding included: count them over the whole
    # training set. The real tokens are a floor no batching can go under.
    real = sum(len(e["input_ids"]) for e in everything)
    record("padding", f"real tokens in one epoch of the {len(everything):,} training sentences", real, "tokens")
    for name, loader in loaders.items():
        loader = make_loader(everything, loader.collate_fn, 16, True, name.endswith("(this repo)"), 0)
        computed = sum(batch["input_ids"].numel() for batch in loader)
        record("padding", f"tokens computed per epoch: {name}", computed, "tokens", f"{computed / real:.2f}x real")
    return medians


def section_multi(args, device):
    for seq in ((32, 1) if not args.quick else (8,)):
        _multi(args, device, seq)


def _multi(args, device, seq):
    """32 rows over 4 adapters: one mixed batch vs 4 swapped sub-batches vs merge/unmerge per sub-batch.
    seq 32 is a sentence; seq 1 is one decoding step of generation, where serving spends its time."""
    print(f"multi-adapter serving (bert-base dims, 32 rows over 4 adapters, seq {seq}, no grad)")
    from multi_lora import MultiAdapterModel
    import tempfile
    from lora_linear import save_adapter, merge_lora_weights, unmerge_lora_weights, load_adapter
    S, rows = (seq, 32) if not args.quick else (seq, 8)
    vocab = 30522 if not args.quick else 1000
    tmp = tempfile.mkdtemp()
    for i in range(4):
        m = mark_only_lora_as_trainable(apply_lora_to_model(bert_base(args.quick, device), ["query", "value"]))
        for _, layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora.lora_B, std=0.01)
        save_adapter(m, os.path.join(tmp, f"a{i}"))
    multi = MultiAdapterModel(bert_base(args.quick, device))
    for i in range(4):
        multi.load_adapter(f"a{i}", os.path.join(tmp, f"a{i}"))
    ids = torch.randint(0, vocab, (rows, S), device=device)
    choice = [f"a{i % 4}" for i in range(rows)]
    groups = {name: torch.tensor([r for r, c in enumerate(choice) if c == name]) for name in multi.adapters}
    merging = [load_adapter(bert_base(args.quick, device).eval(), os.path.join(tmp, f"a{i}")) for i in range(1)]

    def mixed():
        with multi.rows(choice):
            multi(input_ids=ids)

    def sequential():
        for name, index in groups.items():
            multi.set_adapter(name)
            multi(input_ids=ids[index])

    single = merging[0]

    def merge_per_request():
        for name, index in groups.items():  # a single-adapter server: merge, run, unmerge for each sub-batch
            merge_lora_weights(single)
            with torch.no_grad():
                single(input_ids=ids[index])
            unmerge_lora_weights(single)
    medians = timed_rounds({"one mixed batch (multi_lora)": mixed, "4 sub-batches, hot swap": sequential,
                            "4 sub-batches, merge/unmerge each": merge_per_request}, args.rounds * 2, 2, device)
    sequential_time = medians["4 sub-batches, hot swap"]
    for name, t in medians.items():
        record("multi", f"seq {S}: {name}", rows / t, "rows/s", f"{sequential_time / t:.2f}x sequential")
    return medians


def run_training_command(cmd, label, offline=False):
    """Run a training script (this repo's or the Trainer reference) into a fresh folder; its training_metrics.json.
    offline: the run uses the bundled assets (HF_HUB_OFFLINE=1 for it alone), also where the Hub is reachable."""
    import tempfile
    out = tempfile.mkdtemp()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} if offline else None
    proc = subprocess.run(cmd + ["--output_dir", out], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(out, "training_metrics.json")) as f:
        return json.load(f)


def batching_floor(seed):
    """Tokens computed in one epoch of the bundled training sentences by this repo's length-grouped batches and
    by random batches with dynamic padding (Trainer's default), and the real tokens. Time is proportional to the
    tokens computed (see the padding section), so ours / random is the share of Trainer's time that batching
    alone can reach: the floor the end-to-end ratio is held against."""
    import assets
    from transformers import AutoTokenizer, DataCollatorWithPadding
    from data import make_loader, tokenize_classification
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir("minilm"))
    train, _ = assets.rotten_tomatoes(seed=seed)
    examples, _ = tokenize_classification(train, tokenizer, ("sentence", None, "label"), 128)
    collate = DataCollatorWithPadding(tokenizer)
    computed = {grouped: sum(batch["input_ids"].numel() for batch in make_loader(examples, collate, 16, True, grouped,
                                                                                 seed)) for grouped in (True, False)}
    return computed[True], computed[False], sum(len(e["input_ids"]) for e in examples)


def run_per_seed(section, runs, seeds, first_seed_only=(), offline=False):
    """Each run of `runs` ({name: (command, precision)}) once per seed, alternating; those in first_seed_only for
    the first seed alone. Records per run the median training time, its ratio to every HF Trainer run, and the
    accuracy's mean, spread and per-seed values with the precision each run used. {name: seconds}."""
    results = {name: [] for name in runs}
    for i, seed in enumerate(seeds):
        for name, (cmd, precision) in runs.items():
            if name in first_seed_only and i > 0:
                continue
            metrics = run_training_command(cmd + ["--seed", str(seed)], name, offline)
            chosen = metrics.get("precision", precision)  # the Trainer's is the one it was given
            results[name].append((metrics["train_time_s"], metrics["best"]["value"], chosen))
            print(f"  seed {seed}: {name}: {metrics['train_time_s']:.1f} s, accuracy {metrics['best']['value']:.4f}, "
                  f"precision {chosen} ({metrics.get('precision_reason', 'set')})", flush=True)
    seconds = {name: statistics.median(t for t, _, _ in rows) for name, rows in results.items()}
    trainers = [name for name in runs if name.startswith("HF Trainer")]
    for name, rows in results.items():
        accuracies = [a for _, a, _ in rows]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        versus = "; ".join(f"{seconds[name] / seconds[t]:.2f}x Trainer ({runs[t][1]})" for t in trainers)
        record(section, name, seconds[name], "s/epoch (median)",
               f"{versus}; accuracy mean {statistics.mean(accuracies):.4f} std {spread:.4f} over {len(rows)} "
               f"seed(s): " + ", ".join(f"{a:.4f}" for a in accuracies)
               + "; precision per seed: " + ", ".join(p for _, _, p in rows))
    return seconds


def section_e2e(args, device):
    """One epoch on the bundled sentences: this repo's command vs HF Trainer + PEFT (and padding to 128, first
    seed only), alternating, once per seed in --seeds: median time, accuracy mean and spread. Where the auto
    precision is not fp32 (a GPU, a CPU with native bf16), both are also run at that precision."""
    print(f"end to end: one epoch of the 3,600 bundled sentences (MiniLM, r=8 q,v, lr 5e-4, batch 16), "
          f"seeds {args.seeds}")
    common = ["--epochs", "1", "--lr", "5e-4", "--device", str(device)]
    # fp32 frozen weights on both sides (the Trainer keeps fp32 master weights): only the loop differs
    ours = [sys.executable, "train_lora_basic.py", "--base_dtype", "fp32", *common]
    reference = [sys.executable, HF_REFERENCE, *common]
    runs = {
        "this repo (train_lora_basic.py), fp32": (ours + ["--precision", "fp32"], "fp32"),
        "HF Trainer + PEFT, fp32": (reference + ["--precision", "fp32"], "fp32"),
        "this repo, padding to 128 (the seed), fp32": (ours + ["--precision", "fp32", "--pad_to_max_length",
                                                              "--group_by_length", "false"], "fp32"),
    }
    auto = resolve_precision("auto", device)
    if auto != "fp32":
        # auto measures fp32 against the half precision before training; the defaults also store the frozen
        # weights in bf16 when bf16 wins (base_dtype auto): what a user of this repo runs
        runs["this repo (train_lora_basic.py), auto (frozen weights fp32)"] = (ours + ["--precision", "auto"], auto)
        runs["this repo, the defaults (precision auto, base_dtype auto)"] = (
            [sys.executable, "train_lora_basic.py", *common], auto)
        runs[f"HF Trainer + PEFT, {auto}"] = (reference + ["--precision", auto], auto)
    if args.quick:
        runs = {k: (cmd + ["--max_train_samples", "64", "--max_eval_samples", "32"], p) for k, (cmd, p) in runs.items()}
    # both sides on MiniLM and the bundled sentences, also where the Hub is reachable; the padded run (5x slower
    # than the others) for one seed
    seconds = run_per_seed("e2e", runs, args.seeds, first_seed_only=("this repo, padding to 128 (the seed), fp32",),
                           offline=True)
    grouped, random_batches, real = batching_floor(args.seeds[0])
    floor = grouped / random_batches
    ours_ratio = seconds["this repo (train_lora_basic.py), fp32"] / seconds["HF Trainer + PEFT, fp32"]
    record("e2e", "batching floor: tokens computed, length-grouped / random batches", floor, "x Trainer",
           f"{grouped:,} / {random_batches:,} tokens (real {real:,}); this repo fp32 at {ours_ratio:.2f}x = "
           f"{ours_ratio / floor:.3f}x the floor")
    return seconds


SST2_TRAIN_ROWS = 67_349  # sentences in GLUE SST-2's training split


def sst2_sized_files(folder, rows=SST2_TRAIN_ROWS, seed=42):
    """(train.csv, validation.csv, what they hold): GLUE SST-2 where the Hub is reachable; otherwise the bundled
    Rotten Tomatoes training sentences (sentence-length text, like SST-2's) repeated to `rows`, evaluated on the
    bundled 400. An epoch then takes as many steps as one of the real SST-2."""
    import csv
    import assets
    from sources import hub_reachable
    if hub_reachable() and rows == SST2_TRAIN_ROWS:
        from datasets import load_dataset
        sst2 = load_dataset("glue", "sst2")
        train, validation, what = list(sst2["train"]), list(sst2["validation"]), "GLUE SST-2"
    else:
        train, validation = assets.rotten_tomatoes(seed=seed)
        what = f"the bundled Rotten Tomatoes sentences repeated to {rows:,}"
        train = [train[i % len(train)] for i in range(rows)]
    paths = []
    for name, split in (("train.csv", train), ("validation.csv", validation)):
        path = os.path.join(folder, name)
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence", "label"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(split)
        paths.append(path)
    return paths[0], paths[1], what


def section_sst2_epoch(args, device):
    """One SST-2-sized epoch (67,349 sentences, about 4,200 steps of 16): where a GPU's per-step overhead shows.
    This repo's defaults, eager and with --compile (fixed bucket shapes; on CUDA mode reduce-overhead, CUDA
    graphs), against HF Trainer + PEFT in fp32 and, where auto is not fp32, in that precision; once per seed.
    On request only (--only sst2_epoch): on a 2-core CPU one epoch takes about half an hour per run."""
    import tempfile
    rows = 256 if args.quick else SST2_TRAIN_ROWS
    train_file, validation_file, what = sst2_sized_files(tempfile.mkdtemp(), rows, args.seeds[0])
    print(f"SST-2-sized epoch: {what}; MiniLM, r=8 q,v, lr 5e-4, batch 16, seeds {args.seeds}")
    data = ["--train_file", train_file, "--validation_file", validation_file]
    common = ["--epochs", "1", "--lr", "5e-4", "--device", str(device), *data]
    ours = [sys.executable, "train_lora_basic.py", "--model", "minilm", *common]
    reference = [sys.executable, HF_REFERENCE, *common]
    auto = resolve_precision("auto", device)
    runs = {"this repo, the defaults": (ours, "auto"), "this repo, --compile": (ours + ["--compile", "true"], "auto"),
            "HF Trainer + PEFT, fp32": (reference + ["--precision", "fp32"], "fp32")}
    if auto != "fp32":
        runs[f"HF Trainer + PEFT, {auto}"] = (reference + ["--precision", auto], auto)
    if args.quick:
        runs = {k: (cmd + ["--max_eval_samples", "32"], p) for k, (cmd, p) in runs.items()}
    return run_per_seed("sst2_epoch", runs, args.seeds)


def section_precision(args, device):
    """Does mixed precision change the result? The training command (3 epochs, MiniLM on the bundled sentences)
    at each precision this device is fast at, with the same seeds: best accuracy and time per run."""
    precisions = ["fp32"]
    if device.type == "cuda":
        precisions += (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
    elif cpu_has_native_bf16():
        precisions.append("bf16")
    if len(precisions) == 1 and not args.quick:
        print("precision: only fp32 is fast on this device (auto = fp32); nothing to compare, skipped")
        return {}
    print(f"precision: {', '.join(precisions)} x seeds {args.seeds} (MiniLM, 3 epochs, r=8 q,v, lr 5e-4, batch 16)")
    extra = ["--max_train_samples", "64", "--max_eval_samples", "32", "--epochs", "1"] if args.quick else []
    results = {}
    for precision in precisions:
        for seed in args.seeds:
            cmd = [sys.executable, "train_lora_basic.py", "--precision", precision, "--base_dtype", "fp32",
                   "--seed", str(seed), "--device", str(device), *extra]
            metrics = run_training_command(cmd, f"{precision} seed {seed}")
            results.setdefault(precision, []).append((metrics["best"]["value"], metrics["train_time_s"]))
    fp32_seconds = statistics.median(t for _, t in results["fp32"])
    for precision, runs in results.items():
        accuracies = [a for a, _ in runs]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        seconds = statistics.median(t for _, t in runs)
        record("precision", f"{precision}: best accuracy, mean over seeds", statistics.mean(accuracies), "",
               f"std {spread:.4f}; seeds {' '.join(map(str, args.seeds))}: {', '.join(f'{a:.4f}' for a in accuracies)}")
        record("precision", f"{precision}: training time (median)", seconds, "s", f"{seconds / fp32_seconds:.2f}x fp32")
    return results


def section_causal(args, device):
    """The GPT-2 track's step offline: SmolLM2-135M, blocks of 8 x 512 tokens of the English text, LoRA r=8 on
    q_proj+v_proj, lr 2e-4, the same number of steps, at the precision auto picks. This repo's command vs HF
    Trainer + PEFT: seconds per step, peak RSS of each run's own process, perplexity on the same eval blocks.
    Each contender runs --causal_rounds times, the order reversed every other round, so that a machine whose
    speed drifts over the minutes (these shared 2-core machines do) weighs on every side alike; time per step
    is the mean over the rounds."""
    steps, block = (2, 64) if args.quick else (args.causal_steps, 512)
    precision = resolve_precision("auto", device)
    print(f"causal LM: SmolLM2-135M, {steps} steps of 8 x {block} tokens, r=8 q_proj+v_proj, precision {precision}")
    common = ["--max_steps", str(steps), "--max_eval_samples", "400", "--device", str(device), "--precision", precision]
    ours = [sys.executable, "train_lora_basic.py", "--model", "smollm2", "--max_length", str(block),
            "--logging_steps", "1", *common]
    reference = [sys.executable, HF_REFERENCE, "--task", "causal_lm", "--block_size", str(block), "--lr", "2e-4",
                 *common]
    contenders = (("this repo (train_lora_basic.py)", ours),
                  ("this repo, --gradient_checkpointing", ours + ["--gradient_checkpointing"]),
                  ("HF Trainer + PEFT", reference))
    runs = {name: [] for name, _ in contenders}
    for round_index in range(args.causal_rounds):
        for name, cmd in contenders[::-1] if round_index % 2 else contenders:
            # offline: both sides on the bundled English text, also where the Hub is reachable
            metrics = run_training_command(cmd, name, offline=True)
            runs[name].append((metrics["train_time_s"] / steps, metrics["peak_memory_mb"], metrics["best"]["value"]))
    results = {name: (statistics.mean(r[0] for r in rounds), max(r[1] for r in rounds), rounds[-1][2])
               for name, rounds in runs.items()}
    (ref_step, ref_peak, ref_ppl) = results["HF Trainer + PEFT"]
    for name, (step, peak, ppl) in results.items():
        each = ", ".join(f"{r[0]:.2f}" for r in runs[name])
        record("causal", f"{name}: time per step", step, "s", f"{step / ref_step:.2f}x Trainer; runs: {each} s")
        record("causal", f"{name}: peak RSS", peak, "MB", f"{peak / ref_peak:.2f}x Trainer")
        record("causal", f"{name}: eval perplexity after {steps} steps", ppl, "", f"{ppl / ref_ppl:.3f}x Trainer")
    return results


def section_profile(args, device):
    """Where one MiniLM LoRA training step spends its time (batch 16 x 28 tokens, the bundled sentences' size)."""
    print("profile (MiniLM, LoRA r=8 q,v, batch 16 x 28 tokens, 5 steps)")
    import assets
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(assets.model_dir("minilm"), num_labels=2).to(device)
    mark_only_lora_as_trainable(apply_lora_to_model(model.train(), ["query", "value"], rank=8, alpha=16))
    batch = {"input_ids": torch.randint(1000, 2000, (16, 28), device=device),
             "labels": torch.randint(0, 2, (16,), device=device)}
    step = make_step(model, batch, "fp32", device)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    for event in events[:6]:
        record("profile", event.key, 100 * event.self_cpu_time_total / total, "% self CPU")
    return events


def section_compile(args, device):
    """Does torch.compile pay within one epoch? MiniLM LoRA steps at the batch shapes length-grouped batches
    produce (16 rows, 12 to 44 tokens): the compile cost of the first shapes against the per-step saving."""
    print("torch.compile (MiniLM, LoRA r=8 q,v, batch 16, 9 sequence lengths, dynamic shapes)")
    import assets
    from transformers import AutoModelForSequenceClassification

    def build():
        torch.manual_seed(0)
        if args.quick:
            model = bert_base(True, device)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(assets.model_dir("minilm"), num_labels=2)
        return mark_only_lora_as_trainable(apply_lora_to_model(model.to(device).train(), ["query", "value"], 8, 16))
    lengths = range(12, 45, 4) if not args.quick else (8, 12)
    vocab = 1000 if args.quick else 20000
    batches = [{"input_ids": torch.randint(100, vocab, (16, n), device=device),
                "labels": torch.randint(0, 2, (16,), device=device)} for n in lengths]
    eager, compiled = build(), build()
    eager_steps = [make_step(eager, b, "fp32", device) for b in batches]
    compiled_model = torch.compile(compiled, dynamic=True)
    compiled_steps = [make_step(compiled_model, b, "fp32", device) for b in batches]
    start = time.perf_counter()
    for step in compiled_steps:  # every shape once: compilation (and any recompilation) happens here
        step()
    first_pass = time.perf_counter() - start
    medians = timed_rounds({"eager": lambda: [s() for s in eager_steps],
                            "compiled": lambda: [s() for s in compiled_steps]}, args.rounds, 1, device)
    per_step = {k: v / len(batches) for k, v in medians.items()}
    record("compile", f"first pass over the {len(batches)} shapes (compiling)", first_pass, "s")
    record("compile", "eager step (median)", per_step["eager"] * 1000, "ms", "1.00x")
    record("compile", "compiled step (median, after compiling)", per_step["compiled"] * 1000, "ms",
           f"{per_step['compiled'] / per_step['eager']:.2f}x eager")
    saving = per_step["eager"] - per_step["compiled"]
    overhead = first_pass - len(batches) * per_step["compiled"]
    if saving > 0:
        record("compile", "steps until compiling pays off", overhead / saving, "steps",
               "one epoch of the bundled 3,600 sentences is 225 steps")
    return per_step


def section_tests(args, device):
    """Wall time of this repo's tests as a user runs them: the quick loop (`pytest -q -m "not slow"`, the median
    of up to 3 runs) and the whole suite once (what CI runs). Only on request (`--only tests`): the suite runs
    this script. With --quick, one small test file stands in for the suite."""
    runs = [("pytest -q -m 'not slow'", ["-m", "not slow"], min(args.rounds, 3)), ("pytest -q", [], 1)]
    for label, selection, rounds in runs:
        if args.quick:
            selection, rounds = selection + [os.path.join("tests", "test_losses.py")], 1
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
                                  cwd=ROOT, capture_output=True, text=True)
            seconds.append(time.perf_counter() - start)
            outcome = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            if proc.returncode != 0:
                raise RuntimeError(f"{label} failed: {outcome}\n{proc.stdout[-2000:]}")
        record("tests", label, statistics.median(seconds), "s", outcome.strip("= "))


SECTIONS = {"step": section_step, "inference": section_inference, "memory": section_memory,
            "padding": section_padding, "multi": section_multi, "e2e": section_e2e, "precision": section_precision,
            "profile": section_profile, "compile": section_compile, "causal": section_causal, "tests": section_tests,
            "sst2_epoch": section_sst2_epoch}
ON_REQUEST = ("tests", "sst2_epoch")  # not part of a plain `python benchmarks/bench.py`


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS),
                        default=[name for name in SECTIONS if name not in ON_REQUEST])
    parser.add_argument("--quick", action="store_true", help="tiny model and few rounds: a smoke test")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="for the precision and e2e sections")
    parser.add_argument("--causal_steps", type=int, default=20,
                        help="optimizer steps per side in the causal section (the first one warms up)")
    parser.add_argument("--causal_rounds", type=int, default=2,
                        help="runs of each side in the causal section, in reversed order every other round")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results.json"))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    ROWS.clear()  # one results file per call (tests call main several times in one process)
    if args.quick:
        args.rounds = 2
    device = pick_device(args.device)
    where = machine(device)
    header = (f"machine: {where['description']}; native CPU bf16: {where['native_cpu_bf16']}; "
              f"auto precision: {where['auto_precision']}; versions: {library_versions()}")
    print(header)
    for name in args.only:
        SECTIONS[name](args, device)
    table = ["| section | contender | value | unit | ratio |", "|---|---|---|---|---|"]
    table += [f"| {s} | {n} | {v:.4g} | {u} | {r} |" for s, n, v, u, r in ROWS]
    print("\n" + header + "\n" + "\n".join(table))
    rows = [dict(zip(("section", "contender", "value", "unit", "ratio"), r)) for r in ROWS]
    write_results(args.output, {"rows": rows}, command_line("benchmarks/bench.py", argv), seeds=args.seeds, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
