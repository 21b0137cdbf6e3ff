"""
Experiments behind discussion.md. One subcommand per question; each writes experiments/results/<name>.json
(and a PNG where there is a plot) and prints what it measured.

    python experiments/run.py q1_spectrum --adapter_dir expected_output     # singular values of B A
    python experiments/run.py q2_rank                                        # ranks 1..64 (small budget)
    python experiments/run.py q3_init_B                                      # zeros vs Kaiming B
    python experiments/run.py q4_targets                                     # which layers
    python experiments/run.py q5_scaling                                     # alpha/r vs none vs rsLoRA
    python experiments/run.py q6_merge_precision --adapter_dir expected_output
    python experiments/run.py q12_vit                                        # where LoRA goes in a ViT

Training experiments use the bundled MiniLM and Rotten Tomatoes sentences through train_lora_basic.main
(the same code as the main command) with a reduced budget, stated in each result.
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
RESULTS = os.path.join(ROOT, "experiments", "results")
BUDGET = ["--model", "minilm", "--max_train_samples", "1200", "--epochs", "2", "--logging_steps", "5",
          "--precision", "fp32"]


def save(name, data):
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump(data, f, indent=2)
    print(json.dumps(data, indent=2)[:3000])


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


def mean_std(values):
    import statistics
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, layer in lora_layers(model):
        s = torch.linalg.svdvals(layer.lora.delta_weight().detach().double())[:16]
        ax.semilogy(range(1, len(s) + 1), s.numpy(), alpha=0.6)
    ax.set(xlabel="singular value index", ylabel="singular value of s*BA", title="Spectrum of learned LoRA updates")
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "q1_spectrum.png"), dpi=110)
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
        acc, std = mean_std(accs)
        rows.append({"rank": rank, "lora_parameters": lora, "accuracy_mean": round(acc, 4),
                     "accuracy_std": round(std, 4), "seconds_per_epoch": round(sum(times) / len(times), 1)})
        print(rows[-1], flush=True)
    save("q2_rank", {"budget": " ".join(BUDGET), "alpha": "2 x rank", "seeds": args.seeds, "rows": rows})


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
        acc, std = mean_std([m["best"]["value"] for m in metrics])
        runs[init] = {"accuracy_mean": round(acc, 4), "accuracy_std": round(std, 4),
                      "first_logged_loss": [m["history"]["train"][0]["loss"] for m in metrics],
                      "eval_loss_per_epoch": [[round(e["eval_loss"], 4) for e in m["epochs"]] for m in metrics]}
    save("q3_init_B", {"relative_change_of_encoder_output_at_step_0": step0, "training": runs,
                       "budget": " ".join(BUDGET), "seeds": args.seeds})


def q4_targets(args):
    """Which layers: query+value, query+key+value, attention + FFN, all (small budget, r=8)."""
    sets = {"query, value": ["query", "value"], "query, key, value": ["query", "key", "value"],
            "attention + FFN": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                "output.dense"], "all": ["all"]}
    rows = []
    for label, targets in sets.items():
        metrics = [train(["--target_modules", *targets], seed) for seed in args.seeds]
        acc, std = mean_std([m["best"]["value"] for m in metrics])
        rows.append({"targets": label, "trainable": metrics[0]["parameters"]["trainable"],
                     "accuracy_mean": round(acc, 4), "accuracy_std": round(std, 4)})
        print(rows[-1], flush=True)
    save("q4_targets", {"budget": " ".join(BUDGET), "rank": 8, "seeds": args.seeds, "rows": rows})


def q5_scaling(args):
    """alpha/r against no scaling and rsLoRA (alpha/sqrt(r)), at a small and a large rank, alpha fixed at 16."""
    rows = []
    for rank in (8, 64):
        for scaling in ("standard", "none", "rslora"):
            s = {"standard": 16 / rank, "none": 1.0, "rslora": 16 / rank ** 0.5}[scaling]
            metrics = [train(["--rank", str(rank), "--alpha", "16", "--scaling", scaling], seed) for seed in args.seeds]
            acc, std = mean_std([m["best"]["value"] for m in metrics])
            rows.append({"rank": rank, "scaling": scaling, "s": round(s, 3), "accuracy_mean": round(acc, 4),
                         "accuracy_std": round(std, 4),
                         "eval_loss_per_epoch": [[round(e["eval_loss"], 4) for e in m["epochs"]] for m in metrics]})
            print(rows[-1], flush=True)
    save("q5_scaling", {"budget": " ".join(BUDGET), "alpha": 16, "seeds": args.seeds, "rows": rows})


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


def q12_vit(args):
    """LoRA on a Vision Transformer: which layers and how many parameters (random weights: no accuracy)."""
    from transformers import ViTConfig, ViTForImageClassification
    from lora_linear import apply_lora_to_model, count_lora_parameters, lora_layers, mark_only_lora_as_trainable
    with torch.device("meta"):
        model = ViTForImageClassification(ViTConfig(num_labels=10))  # ViT-B/16 dimensions
    apply_lora_to_model(model, None, rank=8, alpha=16)  # default for ViT: q_proj, v_proj (transformers 5 names)
    mark_only_lora_as_trainable(model)
    counts = count_lora_parameters(model)
    save("q12_vit", {"config": "ViT-B/16 dimensions, 10 classes, random weights (no pretrained ViT offline)",
                     "targets": sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)}),
                     "wrapped_layers": len(lora_layers(model)), **counts})


COMMANDS = {f.__name__: f for f in (q1_spectrum, q2_rank, q3_init_B, q4_targets, q5_scaling, q6_merge_precision, q12_vit)}


def main():
    parser = argparse.ArgumentParser(description="Experiments behind discussion.md")
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--adapter_dir", default=os.path.join(ROOT, "expected_output"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    start = time.time()
    COMMANDS[args.command](args)
    print(f"{args.command} took {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
