"""Every measured figure in the docs has a committed result file behind it, and drifts from it fail here.

Each table or paragraph of measured figures in README.md, GUIDE.md, discussion.md, checklist.md and
benchmarks/RESULTS.md is preceded by an HTML comment naming its result files, for example
`<!-- results: benchmarks/results/causal_cpu_native_bf16.json -->`. The rules (what counts as a figure, how it
must match its file, what is exempt and why) are in tests/doc_numbers.py.
"""
import os
import re

import pytest

import doc_numbers
from doc_numbers import ALLOWED, DOCS, ROOT, check_doc, missed_mutations


@pytest.mark.parametrize("doc", DOCS)
def test_every_measured_figure_comes_from_a_committed_result_file(doc):
    problems, _ = check_doc(doc)
    assert not problems, f"{len(problems)} problem(s) with the figures of {doc}:\n" + "\n".join(problems)


def test_the_docs_name_their_result_files():
    """The annotations exist and cover the figures that matter: the main run, the GPT-2 track, the experiments."""
    checked = {doc: len(check_doc(doc)[1]) for doc in DOCS}
    assert checked["README.md"] >= 30 and checked["discussion.md"] >= 150 and checked["benchmarks/RESULTS.md"] >= 20
    named = set()
    for doc in DOCS:
        for _, sources, _ in doc_numbers.parse_doc(doc)[1]:
            named.update(s.partition("#")[0] for s in sources)
    for required in ("expected_output/training_metrics.json", "expected_output/gpt2_cpu/training_metrics.json",
                     "benchmarks/results/causal_cpu_native_bf16.json", "experiments/results/q2_rank.json"):
        assert required in named, f"no doc names {required}"


def test_every_allowed_phrase_is_still_in_its_doc():
    """A stale entry of ALLOWED would exempt a figure that no longer exists: remove it."""
    for doc, pattern, why in ALLOWED:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        assert re.search(pattern, text), f"ALLOWED entry {pattern!r} ({why}) matches nothing in {doc}: remove it"


def test_a_changed_digit_is_caught():
    """Change one digit of a figure and the check fails: for a few figures by hand, and for most of all of them
    (a one-digit change can land on another value of the same record, e.g. a per-seed accuracy, or on a ratio
    that the figures beside it also give: those few cannot be told apart)."""
    def problems_after(doc, old, new):
        lines = open(os.path.join(ROOT, doc), encoding="utf-8").read().splitlines()
        hits = [i for i, line in enumerate(lines) if old in line]
        assert hits, f"{old!r} is no longer in {doc}: pick another figure for this test"
        lines[hits[0]] = lines[hits[0]].replace(old, new, 1)
        return check_doc(doc, lines=lines)[0]

    for doc, old, new, figure in [("README.md", "0.5075 -> 0.8025", "0.5075 -> 0.8035", "0.8035"),
                                  ("README.md", "| 3,306 MB RSS |", "| 3,307 MB RSS |", "3,307 MB"),
                                  ("benchmarks/RESULTS.md", "| 12.63 s (0.71x", "| 12.73 s (0.71x", "12.73 s"),
                                  ("discussion.md", "| 73,728 | 0.754 +- 0.017", "| 73,728 | 0.755 +- 0.017", "0.755"),
                                  ("discussion.md", "| fp32 | 2.0e-6 |", "| fp32 | 2.1e-6 |", "2.1e-6")]:
        problems = problems_after(doc, old, new)
        assert any(f": {figure} is not in " in p for p in problems), f"{doc}: {old!r} -> {new!r} went unnoticed"

    missed, tried = [], 0
    for doc in DOCS:
        m, t = missed_mutations(doc)
        missed += m
        tried += t
    assert tried > 400
    assert len(missed) <= 0.2 * tried, f"{len(missed)} of {tried} one-digit changes unnoticed:\n" + "\n".join(missed)


def test_a_measured_figure_outside_any_annotation_fails_and_sources_must_be_result_files():
    lines = open(os.path.join(ROOT, "GUIDE.md"), encoding="utf-8").read().splitlines()
    lines.append("One epoch took 12.5 s and 1,508 MB, 1.7x the floor.")
    problems = check_doc("GUIDE.md", lines=lines)[0]
    assert [p.split(" looks measured")[0] for p in problems] == [f"GUIDE.md:{len(lines)}: {f}"
                                                                 for f in ("12.5 s", "1,508 MB", "1.7x")]
    lines[-1:] = ["<!-- results: config.yaml -->", "One epoch took 12.5 s."]
    assert "not a committed result file" in " ".join(check_doc("GUIDE.md", lines=lines)[0])
