"""Every measured figure in the docs comes from a committed result file, and drifts fail here.

A block of figures (a table, or a paragraph) is preceded by a comment naming its source files:

    <!-- results: benchmarks/results/e2e_cpu_no_native_bf16.json expected_output/training_metrics.json -->

Each measured-looking number in the block (with a unit: s, ms, MB, GB, x, %, or a decimal like 0.7525) must
equal a value of those files as the doc rounds it, a value's percentage, MB as GB, or the ratio of two values.
A block of figures measured before results were committed says so instead, and is counted, not checked:

    <!-- unbacked: why, and the command that re-measures it -->

Any other block with a measured-looking number fails: a new figure needs its file.
"""
import json
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "GUIDE.md", "discussion.md", "checklist.md", "benchmarks/RESULTS.md")
MARKER = re.compile(r"<!--\s*(results|unbacked):\s*(.*?)\s*-->")
# a number with a unit of time, memory, ratio or share, or a decimal with at least two places (accuracy, loss)
MEASURED = re.compile(r"(?<![\w.\-/])(\d[\d,]*(?:\.\d+)?)(?:\s?(ms|s/epoch|s/step|s|min|MB|GB|%)|(x))(?![\w/])"
                      r"|(?<![\w.\-/])(\d+\.\d{2,})(?![\w.])")


def blocks(text):
    """(first line number, marker kind, marker argument, lines) per block: a table, or a paragraph."""
    lines = text.split("\n")
    out, current, start, marker, fenced = [], [], 0, None, False
    for number, line in enumerate(lines + [""], 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        found = MARKER.fullmatch(line.strip())
        if found:
            marker = found.groups()
            continue
        if line.strip():
            if not current:
                start = number
            current.append(line)
            continue
        if current:
            out.append((start, *(marker or (None, None)), current))
            current, marker = [], None
    return out


def measured_numbers(line):
    """(text as printed, value, decimals) of each measured-looking number in a line."""
    line = re.sub(r"`[^`]*`", "", line)  # commands and names: seeds, ranks, flags are settings, not results
    line = re.sub(r"\d+ x \d+", "", line)  # shapes: 8 x 128 tokens
    line = re.sub(r"\(\d[\d,]* s[;)]", "(", line)  # how long a command took, as it printed: not a result
    line = re.sub(r"\b(?:r|rank|alpha|batch|seed|seeds|lr|step|steps|epoch|epochs|block|blocks|top|dropout|decay|"
                  r"warmup|learning rate|ratio)\s?[=:]?\s?[\d.]+(?:e-?\d+)?", "", line, flags=re.I)
    for match in MEASURED.finditer(line):
        text = match.group(1) or match.group(4)
        digits = text.replace(",", "")
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        yield match.group(0), float(digits), decimals


def numbers_in(value, found):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        found.append(float(value))
    elif isinstance(value, dict):
        for item in value.values():
            numbers_in(item, found)
    elif isinstance(value, list):
        for item in value:
            numbers_in(item, found)
    elif isinstance(value, str):
        found.extend(float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*\.?\d*(?:e-?\d+)?", value)
                     if n.replace(",", "").replace(".", "").lstrip("-").isdigit())


def source_values(paths):
    found = []
    for path in paths:
        full = os.path.join(ROOT, path)
        assert os.path.isfile(full), f"results marker names {path}, which is not a committed file"
        text = open(full, encoding="utf-8").read()
        if path.endswith(".json"):
            numbers_in(json.loads(text), found)
        else:
            numbers_in(text, found)
    values = np.array(sorted(set(v for v in found if np.isfinite(v))))
    return values


def matches(value, decimals, values):
    tolerance = 0.5 * 10 ** -decimals + 1e-9
    candidates = [values, values * 100, values / 1024, values / 60]
    if any(np.any(np.abs(c - value) <= tolerance) for c in candidates):
        return True
    nonzero = values[values != 0]
    ratios = values[:, None] / nonzero[None, :]
    return bool(np.any(np.abs(ratios - value) <= tolerance))


def doc_blocks():
    for doc in DOCS:
        for start, kind, argument, lines in blocks(open(os.path.join(ROOT, doc), encoding="utf-8").read()):
            yield doc, start, kind, argument, lines


def test_every_measured_figure_has_a_committed_file_and_matches_it():
    problems, checked, unbacked = [], 0, 0
    for doc, start, kind, argument, lines in doc_blocks():
        figures = [(start + i, text, value, decimals) for i, line in enumerate(lines)
                   for text, value, decimals in measured_numbers(line)]
        if not figures:
            continue
        if kind == "unbacked":
            unbacked += 1
            continue
        if kind is None:
            line, text = figures[0][:2]
            problems.append(f"{doc}:{line}: '{text}' has no <!-- results: FILE --> above its block; name the "
                            f"committed result file it comes from (or mark the block unbacked, saying why)")
            continue
        values = source_values(argument.split())
        for line, text, value, decimals in figures:
            checked += 1
            if not matches(value, decimals, values):
                problems.append(f"{doc}:{line}: '{text}' is not in {argument} (as a value, a percentage, MB as "
                                f"GB, or a ratio of two values); re-measure or correct the doc")
    assert not problems, "\n".join(problems[:40]) + (f"\n... and {len(problems) - 40} more" if len(problems) > 40
                                                     else "")
    assert checked >= 50, checked
    print(f"{checked} figures checked against their files; {unbacked} blocks marked unbacked")


@pytest.mark.parametrize("doc_line, source, ok", [
    ("| this repo | 51.2 s | 0.60x |", {"ours": 51.2, "trainer": 85.7}, True),        # a value, a ratio
    ("| this repo | 51.3 s | 0.60x |", {"ours": 51.2, "trainer": 85.7}, False),       # drifted
    ("accuracy 0.7525, 2.6 GB RSS", {"acc": 0.7525, "rss_mb": 2567}, True),          # MB as GB
    ("evaluation 10.9% of the run", {"eval_s": 55.7, "run_s": 512.9}, True),         # a share
])
def test_the_checker_accepts_what_the_file_says_and_refuses_a_drift(tmp_path, doc_line, source, ok):
    values = np.array(sorted(source.values()), dtype=float)
    results = [matches(value, decimals, values) for _, value, decimals in measured_numbers(doc_line)]
    assert results and all(results) == ok
