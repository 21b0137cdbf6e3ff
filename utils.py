"""The course's command:  python utils.py compare_ranks --results_dir results

A table (and a plot) of every finished run below a folder: rank, alpha, targets, trainable parameters, the best
accuracy or perplexity, time and memory, sorted by what varies between the runs. The helpers the other scripts
share live in modules named for their job: config.py, sources.py, precision.py, report.py.
"""

import argparse
import json
import math
import os
import sys
from typing import List, Optional, Tuple

from config import ConfigError
from report import save_figure_atomic


SWEEP_FIELDS = ("rank", "alpha", "target_modules", "learning_rate", "scaling", "precision")



def collect_runs(results_dir: str) -> Tuple[List[dict], List[str]]:
    """Every training_metrics.json below results_dir: (runs, problems). A file that cannot be read or lacks a
    value the table needs is a problem (the run is skipped), never an abort of the whole table. Hidden folders
    (a run being overwritten is moved aside into one) are not runs."""
    runs, problems = [], []
    for root, dirs, files in os.walk(results_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "training_metrics.json" in files:
            path = os.path.join(root, "training_metrics.json")
            try:
                with open(path, encoding="utf-8") as f:
                    metrics = json.load(f)
                runs.append({"run": os.path.relpath(root, results_dir), **_run_row(metrics)})
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:  # ValueError: JSON, UTF-8
                problems.append(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return runs, problems



def _number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} is {value!r}, not a number")
    return value



def _run_row(metrics):
    config = metrics["config"]
    targets = metrics.get("adapted_layers") or config["lora"]["target_modules"] or "default"
    metric = metrics["best"]["metric_name"]
    if metric not in ("accuracy", "perplexity"):
        raise ValueError(f"best metric_name is {metric!r}")
    peak = metrics.get("peak_memory_mb")
    return {"rank": _number(config["lora"]["rank"], "rank"), "alpha": _number(config["lora"]["alpha"], "alpha"),
            "target_modules": targets if isinstance(targets, str) else ",".join(targets),
            "learning_rate": config["training"]["learning_rate"], "scaling": config["lora"]["scaling"],
            "precision": metrics.get("precision"), "trainable": int(_number(metrics["parameters"]["trainable"],
                                                                            "trainable parameters")),
            "metric": metric, "best": _number(metrics["best"]["value"], "best value"),
            "time_s": _number(metrics["train_time_s"], "train_time_s"),
            "peak_mb": _number(peak, "peak_memory_mb") if peak is not None else None}



def compare_ranks(results_dir: str, sort_by: Optional[str] = None) -> List[dict]:
    """Print a table of every finished run below results_dir, sorted by sort_by (default: the first field that
    varies), save a bar plot beside them (comparison_<field>.png) and return the rows."""
    if not os.path.isdir(results_dir):
        raise ConfigError(f"results_dir '{results_dir}' does not exist; train some runs into it first")
    runs, problems = collect_runs(results_dir)
    for problem in problems:
        print(f"warning: skipped {problem}")
    if not runs:
        raise ConfigError(f"no training_metrics.json found below '{results_dir}'; run e.g. "
                          f"python train_lora_basic.py --rank 4 --output_dir {results_dir}/rank_4")
    varying = [f for f in SWEEP_FIELDS if len({str(r[f]) for r in runs}) > 1] or ["rank"]
    key = sort_by or varying[0]
    runs.sort(key=lambda r: (r[key] is None, str(type(r[key])), r[key] if r[key] is not None else 0))
    metrics = sorted({r["metric"] for r in runs})
    print(f"{len(runs)} runs in {results_dir}; varying: {', '.join(varying)}")
    if len(metrics) > 1:  # accuracy (higher is better) and perplexity (lower) are never one column
        print(f"note: these runs report different metrics ({' and '.join(metrics)}); compare each within its own")
    # the metric is named on every row: a classification and a language-model run can share a results folder
    # run folders are named by their configuration (results/<model>_<what differs>): show the whole name
    width = min(max(len(r["run"]) for r in runs), 80) + 1
    header = f"{'run':<{width}}{'rank':>5}{'alpha':>7}  {'targets':<18}{'trainable':>11}  {'metric':<11}{'best':>9}" \
             f"{'time s':>9}{'peak MB':>9}"
    print(header + "\n" + "-" * len(header))
    for r in runs:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        print(f"{r['run'][:width - 1]:<{width}}{r['rank']:>5}{r['alpha']:>7g}  {r['target_modules'][:17]:<18}{r['trainable']:>11,}"
              f"  {r['metric']:<11}{r['best']:>9.4f}{r['time_s']:>9.1f}{peak:>9}")
    plot_path = os.path.join(results_dir, f"comparison_{key}.png")
    _plot_comparison(runs, key, plot_path)
    print(f"plot: {plot_path}")
    return runs



def _plot_comparison(runs, key, path):
    """Best metric, trainable parameters and time per run; one metric panel per metric (never mixed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = sorted({r["metric"] for r in runs})
    panels = [("best", f"best {m}", m) for m in metrics] + [("trainable", "trainable parameters", None),
                                                             ("time_s", "training time (s)", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    for ax, (field, title, metric) in zip(axes, panels):
        shown = [r for r in runs if metric is None or r["metric"] == metric]
        labels = [str(r[key]) for r in shown]
        values = [r[field] for r in shown]
        ax.bar(range(len(shown)), values, color="tab:blue")
        ax.set_xticks(range(len(shown)), labels, rotation=30 if len(labels) > 6 else 0)
        ax.set(title=title, xlabel=key)
        ax.grid(axis="y", alpha=0.3)
        if metric is not None:
            ax.set_ylim(min(values) - 0.05 * (abs(min(values)) or 1), max(values) * 1.02 or 1)
    save_figure_atomic(fig, path)



def main(argv: Optional[List[str]] = None) -> int:
    """`python utils.py compare_ranks [--results_dir DIR] [--sort_by FIELD]`: exit status 0, or 2 with one line."""
    parser = argparse.ArgumentParser(description="Compare LoRA runs (rank or alpha sweeps).")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare_ranks", help="table and plot of every run below --results_dir")
    cmp.add_argument("--results_dir", default="results")
    cmp.add_argument("--sort_by", choices=SWEEP_FIELDS, default=None, help="default: the first field that varies")
    args = parser.parse_args(argv)
    try:
        compare_ranks(args.results_dir, args.sort_by)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
