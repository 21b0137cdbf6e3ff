"""
Experiments behind discussion.md. One subcommand per question; each writes experiments/results/<name>.json
(and a PNG where there is a plot) and prints what it measured.

    python experiments/run.py q1_spectrum --adapter_dir expected_output     # singular values of B A
    python experiments/run.py q2_rank                                        # ranks 1..64 (small budget)
    python experiments/run.py q3_init_B                                      # zeros vs Kaiming B
    python experiments/run.py q4_targets                                     # which layers
    python experiments/run.py q5_scaling                                     # alpha/r vs none vs rsLoRA
    python experiments/run.py q6_merge_precision --adapter_dir expected_output
    python experiments/run.py q7_memory                                      # memory and time per step
    python experiments/run.py q7_saved                                       # what autograd keeps, causal LM
    python experiments/run.py q7_causal_step                                 # the causal step: memory, time
    python experiments/run.py q7_causal_profile                              # where its time goes, vs Trainer's
    python experiments/run.py q8_inference --adapter_dir expected_output     # merged vs pruned vs int8
    python experiments/run.py q10_methods                                    # LoRA, BitFit, full FT, Houlsby, IA3, prefix
    python experiments/run.py q11_dynamic_rank                               # rank allocated by singular values
    python experiments/run.py q11_adaptive_rank                              # rank reallocated during training
    python experiments/run.py q12_vit --seeds 42 43 44                       # ViT: LoRA layers; transfer on digits

Training subcommands take --seeds (e.g. --seeds 42 43 44) and report mean and standard deviation. They use the
bundled MiniLM and Rotten Tomatoes sentences with a reduced budget (BUDGET below, stated in each result): Q2-Q5
through train_lora_basic.main, the same code as the main command; Q10 and Q11 through plain_train, the same
loop in memory, with a prepare() hook that builds the models LoRA training does not (BitFit, full fine-tuning,
PEFT's).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from harness import measure_in_child, peak_memory_during, timed_rounds, write_results  # noqa: E402
from report import save_figure_atomic  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
# 150 steps of batch 16. lr 1e-3, not the main config's 5e-4: chosen after a pilot at 5e-4 that seemed too slow to
# start within 150 steps (its figures were not kept).
LORA_LR = 1e-3
BUDGET = ["--model", "minilm", "--max_train_samples", "1200", "--epochs", "2", "--logging_steps", "5",
          "--precision", "fp32", "--lr", str(LORA_LR)]


def budget_string(lr=None):
    """BUDGET as run: with the learning rate a command actually used (None: each row states its own)."""
    assert BUDGET[-2] == "--lr"
    return " ".join(BUDGET[:-2] + (["--lr", f"{lr:g}"] if lr is not None else ["(lr: each row's)"]))


def save(name, data):
    """experiments/results/<name>.json through the benchmarks' harness: the header (command, commit, machine,
    versions, date, seeds: a "seeds" entry of `data` goes there), then the figures."""
    figures = dict(data)
    seeds = figures.pop("seeds", None)
    write_results(os.path.join(RESULTS, name + ".json"), figures, seeds=seeds)
    print(json.dumps(figures, indent=2)[:3000])


def train(extra, seed):
    """One small-budget run through the main training code; returns its training_metrics.json."""
    import contextlib
    import io
    import train_lora_basic
    out = tempfile.mkdtemp()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = train_lora_basic.main(BUDGET + ["--seed", str(seed), "--output_dir", out, *extra])
    if code != 0:
        raise RuntimeError(f"training {extra} failed with status {code}")
    with open(os.path.join(out, "training_metrics.json")) as f:
        return json.load(f)


def accuracy_summary(values):
    """Mean, sample standard deviation and the per-seed values (seeds are paired across the rows of a table:
    the seed also picks the training subset and the validation split)."""
    import statistics
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"accuracy_mean": round(statistics.mean(values), 4), "accuracy_std": round(std, 4),
            "accuracy_per_seed": [round(v, 4) for v in values]}


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(6, 4))


def _save_figure(fig, name):
    save_figure_atomic(fig, os.path.join(RESULTS, name))


def load_minilm_with_adapter(adapter_dir):
    import assets
    from transformers import AutoModelForSequenceClassification
    from lora_linear import load_adapter
    model = AutoModelForSequenceClassification.from_pretrained(assets.model_dir("minilm"), num_labels=2)
    return load_adapter(model, adapter_dir).eval()


def q1_spectrum(args):
    """Singular values of each learned s*B A: how much of the update lives in its top directions."""
    from lora_linear import lora_layers
    model = load_minilm_with_adapter(args.adapter_dir)
    layers = {}
    for name, layer in lora_layers(model):
        s = torch.linalg.svdvals(layer.lora.delta_weight().detach().double())
        energy = (s ** 2).cumsum(0) / (s ** 2).sum()
        layers[name] = {"top8": [round(v, 5) for v in s[:8].tolist()],
                        "energy_top1": round(energy[0].item(), 4), "energy_top4": round(energy[3].item(), 4),
                        "rank_1e-6": int((s > s[0] * 1e-6).sum())}
    fig, ax = _figure()
    for name, layer in lora_layers(model):
        s = torch.linalg.svdvals(layer.lora.delta_weight().detach().double())[:16]
        ax.semilogy(range(1, len(s) + 1), s.numpy(), alpha=0.6)
    ax.set(xlabel="singular value index", ylabel="singular value of s*BA", title="Spectrum of learned LoRA updates")
    _save_figure(fig, "q1_spectrum.png")
    save("q1_spectrum", {"adapter_dir": args.adapter_dir, "layers": layers})


def q2_rank(args):
    rows = []
    for rank in (1, 2, 4, 8, 16, 32, 64):
        accs, times = [], []
        for seed in args.seeds:
            m = train(["--rank", str(rank), "--alpha", str(2 * rank)], seed)
            accs.append(m["best"]["value"])
            times.append(m["train_time_s"] / len(m["epochs"]))
            lora = m["parameters"]["lora"]
        rows.append({"rank": rank, "lora_parameters": lora, **accuracy_summary(accs),
                     "seconds_per_epoch": round(sum(times) / len(times), 1)})
        print(rows[-1], flush=True)
    fig, ax = _figure()
    ax.errorbar([r["lora_parameters"] for r in rows], [r["accuracy_mean"] for r in rows],
                yerr=[r["accuracy_std"] for r in rows], marker="o", capsize=3)
    for r in rows:
        ax.annotate(f"r={r['rank']}", (r["lora_parameters"], r["accuracy_mean"]), textcoords="offset points",
                    xytext=(4, -12))
    ax.set(xscale="log", xlabel="LoRA parameters", ylabel=f"validation accuracy (mean, std over {len(args.seeds)} seeds)",
           title="Rank: parameters against accuracy")
    _save_figure(fig, "q2_rank.png")
    save("q2_rank", {"budget": budget_string(LORA_LR), "alpha": "2 x rank", "seeds": args.seeds, "rows": rows})


def q3_init_B(args):
    """B = 0 starts at the pretrained function; Kaiming B starts somewhere else."""
    import assets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from lora_linear import apply_lora_to_model
    folder = assets.model_dir("minilm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer([r["sentence"] for r in assets.rotten_tomatoes()[1][:64]], padding=True, return_tensors="pt")
    step0 = {}
    for init in ("zeros", "kaiming"):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
        with torch.no_grad():
            hidden = base.bert(**batch).last_hidden_state
        apply_lora_to_model(base, ["query", "value"], rank=8, alpha=16, init_B=init)
        with torch.no_grad():
            adapted = base.bert(**batch).last_hidden_state
        step0[init] = round(((adapted - hidden).norm() / hidden.norm()).item(), 6)
    runs = {}
    for init in ("zeros", "kaiming"):
        metrics = [train(["--init_B", init], seed) for seed in args.seeds]
        runs[init] = {**accuracy_summary([m["best"]["value"] for m in metrics]),
                      "first_logged_loss": [m["history"]["train"][0]["loss"] for m in metrics],
                      "train_loss_curves": [[[e["step"], round(e["loss"], 4)] for e in m["history"]["train"]]
                                            for m in metrics],
                      "eval_loss_per_epoch": [[round(e["eval_loss"], 4) for e in m["epochs"]] for m in metrics]}
    fig, ax = _figure()
    for (init, run), color in zip(runs.items(), ("tab:blue", "tab:red")):
        for i, curve in enumerate(run["train_loss_curves"]):
            ax.plot(*zip(*curve), color=color, alpha=0.6, label=f"B = {init}" if i == 0 else None)
    ax.set(xlabel="optimizer step", ylabel="training loss (mean of the last 5 steps)",
           title=f"B at zero against Kaiming B ({len(args.seeds)} seeds each)")
    ax.legend()
    _save_figure(fig, "q3_init_B.png")
    save("q3_init_B", {"relative_change_of_encoder_output_at_step_0": step0, "training": runs,
                       "budget": budget_string(LORA_LR), "seeds": args.seeds})


def q4_targets(args):
    """Which layers: query+value, query+key+value, attention + FFN, all (small budget, r=8)."""
    sets = {"query, value": ["query", "value"], "query, key, value": ["query", "key", "value"],
            "attention + FFN": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                "output.dense"], "all": ["all"]}
    rows = []
    for label, targets in sets.items():
        metrics = [train(["--target_modules", *targets], seed) for seed in args.seeds]
        rows.append({"targets": label, "trainable": metrics[0]["parameters"]["trainable"],
                     **accuracy_summary([m["best"]["value"] for m in metrics])})
        print(rows[-1], flush=True)
    save("q4_targets", {"budget": budget_string(LORA_LR), "rank": 8, "seeds": args.seeds, "rows": rows})


def q5_scaling(args):
    """alpha/r against no scaling and rsLoRA (alpha/sqrt(r)), at a small and a large rank, alpha fixed at 16."""
    rows = []
    for rank in (8, 64):
        for scaling in ("standard", "none", "rslora"):
            s = {"standard": 16 / rank, "none": 1.0, "rslora": 16 / rank ** 0.5}[scaling]
            metrics = [train(["--rank", str(rank), "--alpha", "16", "--scaling", scaling], seed) for seed in args.seeds]
            rows.append({"rank": rank, "scaling": scaling, "s": round(s, 3),
                         **accuracy_summary([m["best"]["value"] for m in metrics]),
                         "eval_loss_per_epoch": [[round(e["eval_loss"], 4) for e in m["epochs"]] for m in metrics]})
            print(rows[-1], flush=True)
    save("q5_scaling", {"budget": budget_string(LORA_LR), "alpha": 16, "seeds": args.seeds, "rows": rows})


def q6_merge_precision(args):
    """Largest logit difference between merged and unmerged models, in fp32 and in bf16."""
    import assets
    from transformers import AutoTokenizer
    from lora_linear import merge_lora_weights
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir("minilm"))
    batch = tokenizer([r["sentence"] for r in assets.rotten_tomatoes()[1][:64]], padding=True, return_tensors="pt")
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_minilm_with_adapter(args.adapter_dir).to(dtype)
        with torch.no_grad():
            unmerged = model(**batch).logits.float()
            merge_lora_weights(model)
            merged = model(**batch).logits.float()
        result[str(dtype).replace("torch.", "")] = {
            "max_abs_logit_difference": (merged - unmerged).abs().max().item(),
            "predictions_changed": int((merged.argmax(-1) != unmerged.argmax(-1)).sum()), "sentences": 64}
    save("q6_merge_precision", result)


# ----------------------------------------------------------------------------- Q10, Q11: one loop for every method

def plain_train(prepare, seed, lr, keep_model=False, on_run=None):
    """Train a model made by `prepare(model)` at the same budget as `train`, with the training script's own
    loop (train_lora_basic.build_run + train_loop: data, length-grouped batches, AdamW with no decay on biases,
    warmup + linear decay, clipping, evaluation), in memory: Q10 needs BitFit, full fine-tuning and
    PEFT-wrapped models too, which prepare() builds in place of the LoRA step. on_run(run), if given, sees the
    built run before training (Q11 hooks its rank allocator into the optimizer there)."""
    import train_lora_basic
    from config import build_arg_parser, load_config
    config = load_config(build_arg_parser("").parse_args(BUDGET + ["--seed", str(seed), "--lr", str(lr)]))
    run = train_lora_basic.build_run(config, torch.device("cpu"), saves=False, prepare=prepare)
    extra = on_run(run) if on_run else None
    train_lora_basic.train_loop(run)
    epochs = [{"seconds": round(e["time_s"], 1), "eval_loss": round(e["eval_loss"], 4),
               "accuracy": round(e["eval_accuracy"], 4)} for e in run.state["epochs"]]
    result = {"seed": seed, "lr": lr, "trainable": sum(p.numel() for p in run.trainable),
              "total": sum(p.numel() for p in run.model.parameters()), "epochs": epochs,
              "best_accuracy": max(e["accuracy"] for e in epochs)}
    if keep_model:
        result["model"], result["tokenizer"] = run.model.eval(), run.tokenizer
    if extra:
        result.update(extra())
    return result


def _lora(targets=("query", "value"), rank=8):
    from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable

    def prepare(model):
        apply_lora_to_model(model, list(targets), rank=rank, alpha=2 * rank, dropout=0.05)
        return mark_only_lora_as_trainable(model)
    return prepare


def _lora_per_layer(ranks):
    """LoRA with a rank of its own per layer ({full layer name: rank}); s = alpha / r = 2 everywhere."""
    from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable

    def prepare(model):
        for rank in sorted(set(ranks.values())):
            apply_lora_to_model(model, [n for n, r in ranks.items() if r == rank], rank=rank, alpha=2 * rank,
                                dropout=0.05)
        return mark_only_lora_as_trainable(model)
    return prepare


def _bitfit(model):
    from lora_linear import mark_only_lora_as_trainable
    return mark_only_lora_as_trainable(model, bias="all")  # no LoRA layers: every bias + the head


def _full(model):
    model._initial_weights = {n: p.detach().clone() for n, p in model.named_parameters()
                              if n.endswith(("query.weight", "value.weight"))}
    return model


def _houlsby(model):
    from baselines import add_houlsby_adapters
    return add_houlsby_adapters(model, bottleneck=8)  # about LoRA r=8's parameter count (the table says)


def _prefix(model):
    from baselines import add_prefix_tuning
    return add_prefix_tuning(model, num_virtual_tokens=20)  # as PEFT's sequence-classification example


def _ia3(model):
    from peft import IA3Config, TaskType, get_peft_model
    return get_peft_model(model, IA3Config(task_type=TaskType.SEQ_CLS))  # PEFT's BERT default: key, value, FFN out


# learning rates from the range of each method's paper or PEFT's examples (discussion.md Q10), not tuned here
METHODS = {
    "LoRA r=8 q,v (this repo)": (_lora(), LORA_LR),
    "BitFit (biases + head)": (_bitfit, 1e-3),
    "full fine-tuning": (_full, 5e-5),
    "Houlsby adapters, bottleneck 8 (hand-written)": (_houlsby, 1e-3),
    "IA3 (peft)": (_ia3, 3e-3),
    # hand-written: PEFT's prefix tuning needs past key values, which BERT no longer takes in transformers 5;
    # lr 1e-2 as in PEFT's prefix-tuning example for sequence classification
    "prefix tuning, 20 tokens (hand-written)": (_prefix, 1e-2),
}


def _latency_ms(models, batch, rounds=15):
    """Median forward latency (ms) of each model on one batch, contenders alternating after two warm-up rounds."""
    def forward(model):
        def call():
            with torch.no_grad():
                model(**batch)
        return call
    medians = timed_rounds({name: forward(model) for name, model in models.items()}, rounds, 2)
    return {name: round(t * 1000, 1) for name, t in medians.items()}


def _spectrum(delta):
    s = torch.linalg.svdvals(delta.double())
    energy = (s ** 2).cumsum(0) / (s ** 2).sum()
    return {"top1": round(energy[0].item(), 4), "top8": round(energy[7].item(), 4),
            "rank_for_90pct": int((energy < 0.9).sum()) + 1, "singular_values": s[:64].tolist()}


def _method_row(label, lr, runs):
    seconds = sorted(e["seconds"] for r in runs for e in r["epochs"])
    row = {"method": label, "lr": lr, "trainable": runs[0]["trainable"], "total": runs[0]["total"],
           **accuracy_summary([r["best_accuracy"] for r in runs]), "seconds_per_epoch": seconds[len(seconds) // 2],
           "runs": runs}
    print({k: v for k, v in row.items() if k != "runs"}, flush=True)
    return row


def q10_lr(args):
    """Q10's methods at another learning rate (--methods bitfit --lr 1e-2): the table uses each method's
    published value, untuned, and a method that has not taken off after 150 steps deserves a second look."""
    keys = {label.split(" ")[0].lower(): label for label in METHODS}  # lora, bitfit, full, ia3, prefix
    unknown = [m for m in args.methods if m not in keys]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {sorted(keys)}")
    rows = [_method_row(keys[m], args.lr, [plain_train(METHODS[keys[m]][0], seed, args.lr) for seed in args.seeds])
            for m in args.methods]
    save(f"q10_lr_{'_'.join(args.methods)}_{args.lr:g}", {"budget": budget_string(args.lr), "seeds": args.seeds,
                                                           "rows": rows})


def q10_methods(args):
    """LoRA, BitFit, full fine-tuning, Houlsby adapters, IA3 and prefix tuning on the same data, budget and loop."""
    from lora_linear import lora_layers, merge_lora_weights
    rows, kept = [], {}
    for label, (prepare, lr) in METHODS.items():
        runs = [plain_train(prepare, seed, lr, keep_model=seed == args.seeds[0]) for seed in args.seeds]
        kept[label] = runs[0].pop("model")
        tokenizer = runs[0].pop("tokenizer")
        rows.append(_method_row(label, lr, runs))
    # Q1's comparison: the spectrum of full fine-tuning's update against LoRA's, same layers, same data
    full, lora = kept["full fine-tuning"], kept["LoRA r=8 q,v (this repo)"]
    spectra = {"full fine-tuning": {}, "LoRA r=8": {}}
    for name, w0 in full._initial_weights.items():
        spectra["full fine-tuning"][name] = _spectrum(full.get_parameter(name).detach() - w0)
    for name, layer in lora_layers(lora):
        spectra["LoRA r=8"][name + ".weight"] = _spectrum(layer.lora.delta_weight().detach())
    _plot_spectra(spectra)
    # inference latency: one batch of 64 validation sentences
    import assets
    batch = tokenizer([r["sentence"] for r in assets.rotten_tomatoes()[1][:64]], padding=True, return_tensors="pt")
    from sources import load_base_model
    base, _, _ = load_base_model("minilm", "classification", 2)
    import copy
    merged = merge_lora_weights(copy.deepcopy(lora))
    latency = _latency_ms({"base model": base.eval(), **kept, "LoRA r=8 q,v, merged": merged}, batch)
    save("q10_methods", {"budget": budget_string(), "seeds": args.seeds, "rows": rows,
                         "latency_ms_batch_64": latency, "update_spectra": spectra})


def _plot_spectra(spectra):
    fig, ax = _figure()
    for (label, layers), color in zip(spectra.items(), ("tab:red", "tab:blue")):
        for i, s in enumerate(layers.values()):
            s = torch.tensor(s["singular_values"][:32])
            ax.semilogy(range(1, len(s) + 1), (s / s[0]).numpy(), color=color, alpha=0.5,
                        label=label if i == 0 else None)
    ax.set(xlabel="singular value index", ylabel="singular value / largest",
           title="Spectrum of the weight update, query and value layers")
    ax.legend()
    _save_figure(fig, "q1_full_vs_lora.png")


def allocate_ranks(singular_values, budget, minimum=1):
    """AdaLoRA's idea in one step: a layer's rank is how many of the `budget` largest singular values, over all
    layers, are its own; every layer keeps at least its `minimum` largest."""
    ranks = {name: minimum for name in singular_values}
    rest = sorted(((s, name) for name, values in singular_values.items() for s in sorted(values, reverse=True)[minimum:]),
                  reverse=True)
    for _, name in rest[:budget - minimum * len(ranks)]:
        ranks[name] += 1
    return ranks


def q11_dynamic_rank(args):
    """Rank by importance: train r=32, read each layer's singular values, give a total rank of 12 x 8 where they
    are largest, retrain; against uniform r=8 (same parameter count) on the same seeds."""
    from lora_linear import lora_layers
    teacher = plain_train(_lora(rank=32), args.seeds[0], LORA_LR, keep_model=True)
    values = {name: torch.linalg.svdvals(layer.lora.delta_weight().detach().double()).tolist()
              for name, layer in lora_layers(teacher.pop("model"))}
    teacher.pop("tokenizer")
    ranks = allocate_ranks(values, budget=8 * len(values))
    print("ranks:", ranks, flush=True)
    rows = []
    for label, prepare in (("uniform r=8", _lora(rank=8)), ("allocated by singular values", _lora_per_layer(ranks))):
        runs = [plain_train(prepare, seed, LORA_LR) for seed in args.seeds]
        rows.append({"setup": label, "trainable": runs[0]["trainable"],
                     **accuracy_summary([r["best_accuracy"] for r in runs]), "runs": runs})
        print({k: v for k, v in rows[-1].items() if k != "runs"}, flush=True)
    save("q11_dynamic_rank", {"budget": budget_string(LORA_LR), "seeds": args.seeds, "teacher_r32": teacher,
                              "allocated_ranks": ranks, "rows": rows})


# ----------------------------------------------------------------------------- Q7: memory and time per step

Q7_MODES = ("full fine-tuning", "LoRA", "LoRA, 4 x 8 accumulation", "LoRA + gradient checkpointing",
            "LoRA + bf16 autocast", "LoRA, base stored in bf16 + autocast")


def q7_memory(args):
    """Peak memory and time per optimizer step on MiniLM, effective batch 32 x 128; one process per setup."""
    rows = []
    for mode in Q7_MODES:
        rows.append({"setup": mode, **measure_in_child("experiments/run.py:q7_child", mode=mode)})
        print(rows[-1], flush=True)
    save("q7_memory", {"model": "all-MiniLM-L6-v2 (bundled), LoRA r=8 q,v", "effective_batch": "32 x 128 tokens",
                       "memory": "CPU peak RSS sampled during 3 optimizer steps (model and interpreter included)",
                       "time": "mean of steps 2 and 3 (step 1 warms up)", "rows": rows})


def q7_saved(args):
    """What autograd keeps for backward on the causal track, by module, per token and layer: SmolLM2-135M, LoRA
    r=8 on q_proj+v_proj, one sequence of 256 tokens. Every tensor a saved-tensor hook sees that is not a
    parameter, counted once per storage; LoRA dropout 0, 0.05 as autograd would keep it (nn.Dropout, then A),
    and 0.05 as lora_linear keeps it (_DropoutThenA: x and a one-byte mask), then with lean_layers' RMSNorm and
    SwiGLU, in fp32 and as a bf16 run trains (frozen weights stored in bf16, bf16 autocast; what is kept does
    not depend on the CPU, only the time)."""
    import collections
    import torch.nn.functional as F
    import lora_linear
    from lean_layers import use_lean_layers
    from losses import ChunkedCausalLM
    from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable
    from precision import autocast_context, trainable_to_fp32
    from sources import load_base_model

    def autograd_dropout(x, A, p):  # what F.linear(nn.Dropout(p)(x), A) keeps: dropout(x) and a float mask
        return F.linear(F.dropout(x, p, training=True), A)

    tokens, rows = 256, []
    for label, dropout, own_dropout, lean, precision in (
            ("no LoRA dropout", 0.0, True, False, "fp32"),
            ("dropout 0.05, autograd's", 0.05, False, False, "fp32"),
            ("dropout 0.05, _DropoutThenA", 0.05, True, False, "fp32"),
            ("dropout 0.05, _DropoutThenA, lean_layers", 0.05, True, True, "fp32"),
            ("dropout 0.05, _DropoutThenA, bf16", 0.05, True, False, "bf16"),
            ("dropout 0.05, _DropoutThenA, lean_layers, bf16 (what training runs)", 0.05, True, True, "bf16")):
        torch.manual_seed(0)
        model, _, _ = load_base_model("smollm2", "causal_lm", 2, "auto", precision)
        trainable_to_fp32(mark_only_lora_as_trainable(apply_lora_to_model(model, ["q_proj", "v_proj"], 8, 16,
                                                                          dropout))).train()
        if lean:
            use_lean_layers(model)
        layers = model.config.num_hidden_layers
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        where, kept = ["outside the layers"], collections.Counter()

        def leave_module(*_):
            where.pop()  # returns None: a forward hook that returned a value would replace the module's output
        for name, module in model.named_modules():  # which kind of module is running: mlp, self_attn, ...
            parts = name.split(".")
            if len(parts) == 4 and parts[1] == "layers" or name.endswith(("q_proj.lora", "v_proj.lora")):
                kind = "LoRA on q_proj, v_proj" if name.endswith("lora") else parts[3]
                module.register_forward_pre_hook(lambda *_, kind=kind: where.append(kind))
                module.register_forward_hook(leave_module)
        seen = set()

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                kept[where[-1]] += storage.nbytes()
            return tensor
        ids = torch.randint(100, 40000, (1, tokens))
        original = lora_linear._DropoutThenA.apply
        lora_linear._DropoutThenA.apply = original if own_dropout else autograd_dropout
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                    autocast_context(precision, torch.device("cpu")):
                ChunkedCausalLM(model)(input_ids=ids, labels=ids)
        finally:
            lora_linear._DropoutThenA.apply = original
        per = {kind: round(n / tokens / layers / 1024, 2) for kind, n in sorted(kept.items())}
        rows.append({"setup": label, "kb_per_token_per_layer": per,
                     "total_kb_per_token_per_layer": round(sum(kept.values()) / tokens / layers / 1024, 2),
                     "gb_at_8x512": round(sum(kept.values()) / tokens * 8 * 512 / 1e9, 2)})
        print(rows[-1], flush=True)
    save("q7_saved", {"model": "SmolLM2-135M (bundled), LoRA r=8 q_proj+v_proj, training mode",
                      "tokens": tokens, "layers": layers,
                      "counted": "tensors saved for backward that are not parameters, once per storage (KB = 1024 B)",
                      "rows": rows})


Q7_CAUSAL_SETUPS = ("autograd's layers, 1,024-position loss chunks", "lean_layers, 1,024-position loss chunks",
                    "lean_layers, loss chunks of CHUNK_ELEMENTS logits",
                    "lean_layers and attention in halves, query heads not stacked, loss chunks of CHUNK_ELEMENTS logits",
                    "lean_layers and attention in halves, loss chunks of CHUNK_ELEMENTS logits",
                    "lean_layers and attention in halves, loss chunks of CHUNK_ELEMENTS logits, freed memory kept "
                    "for reuse (training's default)")


def q7_causal_step(args):
    """The causal track's training step: SmolLM2-135M, LoRA r=8 on q_proj+v_proj with dropout 0.05, a batch of
    8 x 512 tokens, at the precision auto picks on this CPU (frozen weights stored in it). With transformers' own
    RMSNorm and SwiGLU or lean_layers', the loss in chunks of 1,024 positions (the previous chunk size) or of
    losses.CHUNK_ELEMENTS logits, and sdpa attention or lean_layers' causal_attention_in_halves, with or without
    the query heads of a key/value head stacked, and with glibc's malloc as it comes or told to keep freed memory
    (precision.keep_freed_memory_for_reuse). Peak RSS, time and page faults in a process per setup; the time
    again with the setups taking turns in one process (q7_causal_times), where the machine's drift over the
    minutes weighs on all alike."""
    from precision import resolve_precision
    precision, rows = resolve_precision("auto", torch.device("cpu")), []
    for setup in Q7_CAUSAL_SETUPS:
        rows.append({"setup": setup, **measure_in_child("experiments/run.py:q7_causal_child", setup=setup,
                                                        precision=precision)})
        print(rows[-1], flush=True)
    in_turns = measure_in_child("experiments/run.py:q7_causal_times", precision=precision)
    for row in rows:
        row["seconds_per_step_in_turns"] = in_turns.get(row["setup"])
    print(in_turns, flush=True)
    save("q7_causal_step", {"model": "SmolLM2-135M (bundled), LoRA r=8 q_proj+v_proj, dropout 0.05",
                            "batch": "8 x 512 tokens", "precision": precision,
                            "memory": "CPU peak RSS sampled during 6 optimizer steps (model and interpreter included)",
                            "time": "seconds_per_step: median of steps 3 to 6 in the setup's own process (steps 1 "
                                    "and 2 grow the allocator's pools), page faults and system time likewise; "
                                    "seconds_per_step_in_turns: q7_causal_times",
                            "rows": rows})


def _causal_setup(model, setup: str, stacked_rows: int):
    """Put the model in a setup of Q7_CAUSAL_SETUPS, whatever setup it was in before, and return its step model
    (stacked_rows: lean_layers.WIDE_QUERY_BLOCK_ROWS as the code has it). The malloc part of a setup is the
    caller's: it holds for the whole process."""
    import lean_layers
    from lean_layers import RMS_NORMS, SWIGLU_MLPS, use_lean_layers
    from losses import ChunkedCausalLM
    for module in model.modules():  # transformers' own forwards back
        if type(module).__name__ in RMS_NORMS + SWIGLU_MLPS and "forward" in vars(module):
            del module.forward
    model.set_attn_implementation("sdpa")
    if setup.startswith("lean_layers"):
        use_lean_layers(model)  # the norms, MLPs and attention in halves
        if "halves" not in setup:
            model.set_attn_implementation("sdpa")  # the norms and MLPs alone
    # not stacked: no group of query heads is ever 2^62 long
    lean_layers.WIDE_QUERY_BLOCK_ROWS = 2 ** 62 if "not stacked" in setup else stacked_rows
    return ChunkedCausalLM(model.train(), chunk_size=1024 if "1,024" in setup else None)


def _smollm2_lora(precision: str):
    """SmolLM2-135M with LoRA r=8 alpha 16 dropout 0.05 on q_proj+v_proj, frozen weights stored in `precision`,
    the LoRA weights in fp32: what build_run makes for the causal track (before lean_layers)."""
    from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable
    from precision import trainable_to_fp32
    from sources import load_base_model
    model, _, _ = load_base_model("smollm2", "causal_lm", 2, "auto", precision)
    trainable_to_fp32(mark_only_lora_as_trainable(apply_lora_to_model(model, ["q_proj", "v_proj"], 8, 16, 0.05)))
    return model


def _timed_causal_steps(step_model, model, precision: str):
    """A step function for the q7 causal children: one optimizer step on the same 8 x 512 random tokens under
    `precision`'s autocast, returning its seconds."""
    from precision import autocast_context
    ids = torch.randint(100, 40000, (8, 512))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = torch.device("cpu")

    def step() -> float:
        start = time.perf_counter()
        with autocast_context(precision, device):
            loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return step


def q7_causal_child(setup: str, precision: str) -> dict:
    """One setup of q7_causal_step, run by harness.measure_in_child in a process of its own."""
    import resource
    import statistics
    import lean_layers
    from precision import keep_freed_memory_for_reuse
    torch.manual_seed(0)
    model = _smollm2_lora(precision)
    step_model = _causal_setup(model, setup, lean_layers.WIDE_QUERY_BLOCK_ROWS)
    if "kept for reuse" in setup:
        keep_freed_memory_for_reuse()
    step, seconds, faults, system = _timed_causal_steps(step_model, model, precision), [], [], []

    def counted_steps():
        for _ in range(6):
            before = resource.getrusage(resource.RUSAGE_SELF)
            seconds.append(step())
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults.append(after.ru_minflt - before.ru_minflt)
            system.append(after.ru_stime - before.ru_stime)
    peak = peak_memory_during(counted_steps, torch.device("cpu"))
    return {"peak_mb": round(peak), "seconds_per_step": round(statistics.median(seconds[2:]), 2),
            "seconds_per_step_all": [round(s, 2) for s in seconds],
            "page_faults_per_step": round(statistics.median(faults[2:])),
            "system_seconds_per_step": round(statistics.median(system[2:]), 2)}


def q7_causal_times(precision: str, rounds: int = 6) -> dict:
    """Seconds per step of each setup of Q7_CAUSAL_SETUPS but the last, in one process (harness.measure_in_child):
    one step of each setup in turn, the order reversed every round, median over `rounds` steps after two of each.
    Freed memory is kept for reuse throughout (training's default; the last setup differs from the one before it
    only in that, so its time here is the same by construction and not measured)."""
    import statistics
    import lean_layers
    from precision import keep_freed_memory_for_reuse
    keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    model, stacked_rows = _smollm2_lora(precision), lean_layers.WIDE_QUERY_BLOCK_ROWS
    setups = Q7_CAUSAL_SETUPS[:-1]
    steps = {setup: _timed_causal_steps(_causal_setup(model, setup, stacked_rows), model, precision)
             for setup in setups}
    times = {setup: [] for setup in setups}
    for round_index in range(-2, rounds):
        for setup in setups[::-1] if round_index % 2 else setups:
            _causal_setup(model, setup, stacked_rows)  # the model's part; the step (its loss chunks) is made above
            seconds = steps[setup]()
            if round_index >= 0:
                times[setup].append(seconds)
    return {setup: round(statistics.median(t), 2) for setup, t in times.items()}


# Profiler op names by kind (self CPU time of each op; the rest is elementwise work, casts and the optimizer)
PROFILE_KINDS = (("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
                 ("attention kernels", ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                        "aten::_scaled_dot_product_flash_attention_for_cpu_backward")),
                 ("softmax and cross-entropy", ("aten::_log_softmax", "aten::_log_softmax_backward_data",
                                                "aten::nll_loss_forward", "aten::nll_loss_backward", "aten::exp_")),
                 ("dtype casts and copies", ("aten::copy_",)))


def q7_causal_profile(args):
    """Where the causal step's time goes, this repo's against HF Trainer + PEFT's, each in a process of its own:
    SmolLM2-135M, LoRA r=8 q_proj+v_proj dropout 0.05, 8 x 512 tokens, at the precision auto picks (Trainer's
    way: fp32 weights under bf16 autocast, PEFT's layers, the model's own loss). Step 3 under torch.profiler
    (self CPU time of each op, by PROFILE_KINDS), after two steps unprofiled; and the median of steps 4 to 6
    without the profiler."""
    from precision import resolve_precision
    precision, rows = resolve_precision("auto", torch.device("cpu")), []
    for side in ("this repo", "HF Trainer + PEFT"):
        rows.append({"side": side, **measure_in_child("experiments/run.py:q7_profile_child", side=side,
                                                      precision=precision)})
        print(rows[-1], flush=True)
    save("q7_causal_profile", {"model": "SmolLM2-135M (bundled), LoRA r=8 q_proj+v_proj, dropout 0.05",
                               "batch": "8 x 512 tokens", "precision": precision,
                               "kinds": {kind: list(ops) for kind, ops in PROFILE_KINDS}, "rows": rows})


def q7_profile_child(side: str, precision: str) -> dict:
    """One side of q7_causal_profile, run by harness.measure_in_child in a process of its own."""
    import statistics
    from torch.profiler import ProfilerActivity, profile
    from lean_layers import use_lean_layers
    from losses import ChunkedCausalLM
    from sources import load_base_model
    torch.manual_seed(0)
    if side == "this repo":  # what build_run makes for this track
        from precision import keep_freed_memory_for_reuse
        model = _smollm2_lora(precision)
        use_lean_layers(model)
        keep_freed_memory_for_reuse()
        step_model = ChunkedCausalLM(model.train())
    else:  # what benchmarks/hf_trainer_reference.py trains
        from peft import LoraConfig, get_peft_model
        model, _, _ = load_base_model("smollm2", "causal_lm", 2, "auto", "fp32")
        step_model = model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                              target_modules=["q_proj", "v_proj"],
                                                              task_type="CAUSAL_LM")).train()
    step = _timed_causal_steps(step_model, model, precision)
    step(), step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        profiled = step()
    seconds = [step() for _ in range(3)]
    self_seconds = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    kinds = {kind: round(sum(self_seconds.get(op, 0.0) for op in ops), 2) for kind, ops in PROFILE_KINDS}
    total = sum(self_seconds.values())
    return {"seconds_per_step": round(statistics.median(seconds), 2), "profiled_step_s": round(profiled, 2),
            "profiled_self_cpu_s": round(total, 2), "by_kind_s": {**kinds, "everything else": round(
                total - sum(kinds.values()), 2)}}


def q7_child(mode: str) -> dict:
    """One setup of q7_memory, run by harness.measure_in_child in a process of its own."""
    from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable
    from precision import autocast_context, trainable_to_fp32
    from sources import load_base_model
    torch.manual_seed(0)
    # what --base_dtype bf16 does in training: LoRA weights are created in fp32 on the bf16 base, the head upcast
    model, _, _ = load_base_model("minilm", "classification", 2, dtype="bf16" if "stored in bf16" in mode else "fp32")
    if mode != "full fine-tuning":
        trainable_to_fp32(mark_only_lora_as_trainable(apply_lora_to_model(model, ["query", "value"], rank=8, alpha=16)))
    if "checkpointing" in mode:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    micro_batches = 4 if "accumulation" in mode else 1
    batch = {"input_ids": torch.randint(1000, 20000, (32 // micro_batches, 128)),
             "labels": torch.randint(0, 2, (32 // micro_batches,))}
    precision, device = ("bf16" if "bf16" in mode else "fp32"), torch.device("cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = []

    def steps():
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(micro_batches):
                with autocast_context(precision, device):
                    loss = model(**batch).loss
                (loss.float() / micro_batches).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
    peak = peak_memory_during(steps, device)
    return {"peak_mb": round(peak), "seconds_per_step": round(sum(seconds[1:]) / 2, 2),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# ----------------------------------------------------------------------------- Q8: merging against compression

def q8_inference(args):
    """The trained adapter (--adapter_dir) served unmerged, merged, and merged then compressed the usual ways:
    magnitude pruning (50%, 80% of every Linear) and int8 dynamic quantization. Accuracy on the 400 validation
    sentences, median latency of a batch of 64, and the bytes each form stores."""
    import copy
    import assets
    from transformers import AutoTokenizer
    from baselines import int8_dynamic, magnitude_prune, state_bytes
    from lora_linear import merge_and_unload
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir("minilm"))
    validation = assets.rotten_tomatoes()[1]
    labels = torch.tensor([r["label"] for r in validation])
    unmerged = load_minilm_with_adapter(args.adapter_dir)
    merged = merge_and_unload(copy.deepcopy(unmerged))
    forms = {"LoRA unmerged": unmerged, "merged (merge_and_unload)": merged,
             "merged + 50% magnitude pruning": magnitude_prune(copy.deepcopy(merged), 0.5),
             "merged + 80% magnitude pruning": magnitude_prune(copy.deepcopy(merged), 0.8),
             "merged + int8 dynamic quantization": int8_dynamic(copy.deepcopy(merged))}
    rows = []
    for label, model in forms.items():
        correct = 0
        with torch.no_grad():
            for start in range(0, len(validation), 100):
                batch = tokenizer([r["sentence"] for r in validation[start:start + 100]], padding=True,
                                  return_tensors="pt")
                correct += int((model(**batch).logits.argmax(-1) == labels[start:start + 100]).sum())
        rows.append({"form": label, "accuracy": round(correct / len(validation), 4),
                     "stored_mb": round(state_bytes(model) / 2**20, 1)})
    batch = tokenizer([r["sentence"] for r in validation[:64]], padding=True, return_tensors="pt")
    latency = _latency_ms(forms, batch)
    for row in rows:
        row["latency_ms_batch_64"] = latency[row["form"]]
    save("q8_inference", {"adapter": os.path.relpath(args.adapter_dir, ROOT), "sentences": len(validation),
                          "threads": torch.get_num_threads(), "rows": rows})


# ----------------------------------------------------------------------------- Q11: rank reallocated during training

def _adaptive(budget_per_layer=8, start_rank=12):
    """LoRA at start_rank everywhere; a RankAllocator masks components until budget_per_layer x layers remain."""
    from baselines import RankAllocator
    from lora_linear import lora_layers

    def on_run(run):
        allocator = RankAllocator(run.model, budget=budget_per_layer * len(lora_layers(run.model)),
                                  start_step=int(0.1 * run.total_steps), end_step=int(0.7 * run.total_steps))

        def before_step(optimizer, args, kwargs):  # gradients are clipped and present here
            allocator.observe()
            allocator.drop_masked_gradients()

        def after_step(optimizer, args, kwargs):  # the loop counts the step right after this
            if run.state["step"] + 1 >= allocator.start_step:
                allocator.reallocate(run.state["step"] + 1)  # also keeps masked parts at zero under AdamW
        run.optimizer.register_step_pre_hook(before_step)
        run.optimizer.register_step_post_hook(after_step)
        return lambda: {"final_ranks": allocator.ranks()}
    return _lora(rank=start_rank), on_run


def q11_adaptive_rank(args):
    """Uniform r=8 against AdaLoRA-style allocation during training (r=12 everywhere, masked down to a total of
    8 x 12 components by smoothed sensitivity), same seeds, data and loop."""
    from baselines import layer_ranks_by_kind
    rows = []
    prepare, on_run = _adaptive()
    for label, (prep, hook) in (("uniform r=8", (_lora(rank=8), None)),
                                ("r=12, masked to 8 x 12 during training", (prepare, on_run))):
        runs = [plain_train(prep, seed, LORA_LR, on_run=hook) for seed in args.seeds]
        row = {"setup": label, "trainable_at_start": runs[0]["trainable"],
               **accuracy_summary([r["best_accuracy"] for r in runs]), "runs": runs}
        if "final_ranks" in runs[0]:
            row["final_ranks_by_kind_seed0"] = layer_ranks_by_kind(runs[0]["final_ranks"])
            row["active_components"] = [sum(r["final_ranks"].values()) for r in runs]
        rows.append(row)
        print({k: v for k, v in row.items() if k != "runs"}, flush=True)
    save("q11_adaptive_rank", {"budget": budget_string(LORA_LR), "seeds": args.seeds, "rows": rows})


# ----------------------------------------------------------------------------- Q12: LoRA on a Vision Transformer

# No pretrained ViT can be loaded offline, so Q12 makes its own "pretrained" model: a tiny ViT trained on real
# handwritten digits 0-4 (scikit-learn's bundled 8x8 digits), then adapted to digits 5-9 with a new head.
TINY_VIT = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                num_attention_heads=4, intermediate_size=128, num_labels=5)
# Every adaptation method gets the same 300 steps of 32 images; pretraining gets more, to start from a model that
# has learned its own task well, as a real pretrained one has.
Q12_STEPS, Q12_PRETRAIN_STEPS, Q12_BATCH = 300, 1000, 32
# Transfer matters most when the new task has few labels: adapt on all the 5-9 training images and on 10 per class.
Q12_PER_CLASS = (None, 10)
# Each method's own learning rate, set once and not tuned on the test split: the methods that train only a few
# new parameters (head, LoRA) take a larger one than those that move every weight.
Q12_LR = {"pretrain": 1e-3, "lora": 5e-3, "head": 5e-3, "full": 1e-3, "scratch": 1e-3}


def _digits(classes):
    """Stratified train/test split (70/30, fixed: the same for every seed) of the real 8x8 digits in `classes`,
    pixels scaled to [-1, 1], labels renumbered 0..len(classes)-1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    keep = [t in classes for t in digits.target]
    x = torch.tensor(digits.images[keep], dtype=torch.float32).unsqueeze(1) / 8 - 1  # 0..16 -> -1..1
    y = torch.tensor(digits.target[keep]) - min(classes)
    train, test = train_test_split(range(len(y)), test_size=0.3, stratify=y.numpy(), random_state=0)
    return (x[train], y[train]), (x[test], y[test])


def _tiny_vit(seed):
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**TINY_VIT))


def _first_per_class(data, n):
    """The first n training images of every class (all of them for n=None): a fixed subset, as the split is."""
    x, y = data
    if n is None:
        return data
    keep = torch.cat([torch.nonzero(y == c).flatten()[:n] for c in y.unique()])
    return x[keep], y[keep]


def _fit(model, data, lr, seed, steps=Q12_STEPS):
    """`steps` AdamW steps of Q12_BATCH random images (drawn with replacement) on the parameters that require
    grad."""
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(x), (Q12_BATCH,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(pixel_values=x[batch]).logits, y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@torch.no_grad()
def _logits(model, x):
    return model.eval()(pixel_values=x).logits


def _accuracy(model, data):
    return (_logits(model, data[0]).argmax(-1) == data[1]).float().mean().item()


def _adapt(method, pretrained, seed):
    """A model ready to train on digits 5-9: the pretrained ViT with a new head and `method`'s trainable set,
    or (scratch) a fresh ViT with nothing pretrained."""
    import copy
    from lora_linear import apply_lora_to_model, mark_only_lora_as_trainable
    if method == "scratch":
        return _tiny_vit(seed)
    model = copy.deepcopy(pretrained)
    torch.manual_seed(seed)
    model.classifier = torch.nn.Linear(model.config.hidden_size, 5)  # new task, new head
    if method == "lora":
        apply_lora_to_model(model, None, rank=8, alpha=16)  # ViT default: q_proj, v_proj
        mark_only_lora_as_trainable(model)  # keeps the new classifier trainable
    elif method == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
    return model


def q12_vit(args):
    """LoRA on a Vision Transformer: which layers and how many parameters at ViT-B/16 size, then accuracy on real
    images: a tiny ViT pretrained on digits 0-4, adapted to digits 5-9 by LoRA, head only, full fine-tuning,
    against the same ViT trained from scratch on 5-9."""
    from transformers import ViTConfig, ViTForImageClassification
    from lora_linear import (apply_lora_to_model, count_lora_parameters, lora_layers, mark_only_lora_as_trainable,
                             merge_lora_weights)
    with torch.device("meta"):
        model = ViTForImageClassification(ViTConfig(num_labels=10))  # ViT-B/16 dimensions
    apply_lora_to_model(model, None, rank=8, alpha=16)  # default for ViT: q_proj, v_proj (transformers 5 names)
    mark_only_lora_as_trainable(model)
    vit_b16 = {"config": "ViT-B/16 dimensions, 10 classes, random weights (parameter count only)",
               "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)}),
               "wrapped_layers": len(lora_layers(model)), **count_lora_parameters(model)}

    # 17 tokens of width 64: splitting such small matrices over threads costs more than it saves (50 steps took
    # 3.5 s on one thread, 115 s on two threads of a busy 2-core machine).
    torch.set_num_threads(1)
    source, target = _digits([0, 1, 2, 3, 4]), _digits([5, 6, 7, 8, 9])
    methods = ("lora", "head", "full", "scratch")
    runs = {(n, m): [] for n in Q12_PER_CLASS for m in methods}
    pretrain_accuracy, merge_diff = [], []
    for seed in args.seeds:  # pretraining too is repeated per seed, so its variance is in the spread
        pretrained = _fit(_tiny_vit(seed), source[0], Q12_LR["pretrain"], seed, Q12_PRETRAIN_STEPS)
        pretrain_accuracy.append(_accuracy(pretrained, source[1]))
        for (per_class, method), results in runs.items():
            model = _adapt(method, pretrained, seed)
            _fit(model, _first_per_class(target[0], per_class), Q12_LR[method], seed + 1)
            results.append({"accuracy": _accuracy(model, target[1]),
                            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)})
            if method == "lora":  # merged weights must give the same logits
                before = _logits(model, target[1][0])
                merge_lora_weights(model)
                merge_diff.append((_logits(model, target[1][0]) - before).abs().max().item())
        print({"seed": seed, "pretrain 0-4": round(pretrain_accuracy[-1], 4),
               **{f"{m} {n or 'all'}": round(r[-1]["accuracy"], 4) for (n, m), r in runs.items()}}, flush=True)
    rows = [{"train_images_5_9": len(_first_per_class(target[0], n)[1]), "method": m, "lr": Q12_LR[m],
             "trainable": r[0]["trainable"], **accuracy_summary([x["accuracy"] for x in r])}
            for (n, m), r in runs.items()]
    save("q12_vit", {"vit_b16": vit_b16, "seeds": args.seeds, "digits": {
        "data": "scikit-learn load_digits (real 8x8 handwritten digits); pretrain on 0-4, adapt to 5-9; "
                "stratified 70/30 split, random_state 0; adaptation on all 5-9 training images or the first 10 "
                "of each class",
        "model": TINY_VIT, "total_parameters": sum(p.numel() for p in _tiny_vit(0).parameters()),
        "train_test": {"0-4": [len(source[0][1]), len(source[1][1])], "5-9": [len(target[0][1]), len(target[1][1])]},
        "pretrain_steps": Q12_PRETRAIN_STEPS, "pretrain_lr": Q12_LR["pretrain"], "steps": Q12_STEPS,
        "batch": Q12_BATCH, "pretrain_accuracy_0_4": accuracy_summary(pretrain_accuracy),
        "lora_merged_max_abs_logit_difference": max(merge_diff), "rows": rows}})


COMMANDS = {f.__name__: f for f in (q1_spectrum, q2_rank, q3_init_B, q4_targets, q5_scaling, q6_merge_precision,
                                    q7_saved, q7_memory, q7_causal_step, q7_causal_profile, q8_inference, q10_methods, q10_lr,
                                    q11_dynamic_rank, q11_adaptive_rank, q12_vit)}


def main():
    parser = argparse.ArgumentParser(description="Experiments behind discussion.md")
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--adapter_dir", default=os.path.join(ROOT, "expected_output"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--methods", nargs="+", default=["bitfit"], help="q10_lr: lora bitfit full houlsby ia3 prefix")
    parser.add_argument("--lr", type=float, default=1e-2, help="q10_lr: the learning rate to try")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    start = time.time()
    COMMANDS[args.command](args)
    print(f"{args.command} took {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
