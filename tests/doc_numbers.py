"""Every measured figure in the docs must come from a committed result file (used by tests/test_doc_numbers.py).

How a doc names its sources. An HTML comment on its own line, invisible on GitHub, names one or more result
files; it covers the next block (a table, a list item with its indented lines, or a paragraph):

    <!-- results: expected_output/training_metrics.json, expected_output/model_comparison.txt -->

or, when an end marker follows before the next opening comment, every line up to the marker:

    <!-- results: experiments/results/q7_memory.json -->
    ... a table and the paragraphs that discuss it ...
    <!-- end results -->

A source may be a part of a json file, `experiments/results/q10_methods.json#latency_ms_batch_64` (keys joined by
dots; `#a+b` names two parts). Sources must lie in RESULT_DIRS: committed result files, never notes by hand.

What is a figure. A number outside code (fenced blocks and `inline code` are skipped), not part of a name
(fp32, GPT-2, H100, SmolLM2-135M), a version (torch 2.13) or a section number (Section 7.1), possibly with a
ratio or percent sign (0.83x, 10.9%), a scale (22.8M) or a unit (s, ms, min, MB, GB, rows/s, samples/s).
Not figures: plain integers without a unit ("3 epochs", "r=8", "batch 16", "74,498 trainable": counts), bare
powers of ten (5e-4, 1e-5: settings and tolerances; 9.5e-7, a mantissa with decimals, is a figure), numbers
after a setting's name (dropout 0.05, lr 1e-3) and targets (at least 0.75, <= 0.45x).

(a) Every figure in a covered block must come from its sources. A file offers its numbers (json numbers,
numbers inside json strings or text files), the median, mean, min, max, sum and standard deviation of every
list of numbers and of every key across sibling json objects, and, for "x" and "%" figures only, the ratio of
two numbers of one json object (trainable / total). A figure matches a number when the number, in the
figure's unit (bytes or MB to MB/GB, seconds to min/ms, a fraction to %), rounds to the figure at the decimals
the doc prints (half up, from the decimal the file writes). In a paragraph any number of the sources will do. A
table row is read as one record, so that a changed digit cannot hide behind a number of another row: per
source, the figure must match inside the deepest json object that holds the row's other figures (the whole
source when none of them matches there), or among the own fields of an object holding as many of them as any
object does. Name parts of a file to keep rows that mix objects apart: `file.json#best+train_time_s`. A figure
may instead be a ratio ("x") or percentage of two numbers with the same unit printed in its row or column
(tables) or in its covered lines (paragraphs, where a difference also counts), or of the file values those
matched.

(b) A figure that looks measured (a unit, "x", %, two or more decimals, or a mantissa with decimals) outside
every covered block fails, unless ALLOWED names it with the reason it is not a measurement, or it is a value
of config.yaml or configs/*.yaml (the defaults table).

missed_mutations() changes the last digit of every checked figure by one, up and down, and lists the changes
the check does not catch; tests/test_doc_numbers.py keeps their share small.
"""
import functools
import glob
import json
import math
import os
import re
import statistics
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "GUIDE.md", "discussion.md", "checklist.md", "benchmarks/RESULTS.md")
RESULT_DIRS = ("expected_output/", "benchmarks/results/", "experiments/results/")
UNMEASURED = "write 'unmeasured in this version'"
WHAT_TO_DO = f"update the figure from the file, re-run the command that writes the file, or {UNMEASURED}"

# Figures that are not measurements: (doc, regular expression within one line, why). Keep this list short.
ALLOWED = [
    ("README.md", r"0\.27% of the", "bert-base parameter share: tests/test_docs.py checks it against the code"),
    ("GUIDE.md", r"\| trainable % \| 0\.270 \|", "bert-base parameter share: tests/test_docs.py checks it"),
    ("README.md", r"about 3\.5 to under 2\.0", "the seed course's claim, quoted"),
    ("README.md", r"loss of 2\.0 is a perplexity of", "the seed course's target, quoted"),
    ("README.md", r"e\^2 = 7\.4", "arithmetic: exp(2)"),
    ("README.md", r"standard error of about 0\.02", "arithmetic: sqrt(0.8 x 0.2 / 400)"),
    ("discussion.md", r"standard error of about 0\.02", "arithmetic: sqrt(0.8 x 0.2 / 400)"),
    ("discussion.md", r"~3\.5x memory saving|seed's 3\.5x", "the seed course's claim, quoted"),
    ("discussion.md", r"3 x 418 MB|3 x 87 MB", "arithmetic: frozen parameters x 4 bytes (fp32)"),
    ("GUIDE.md", r"800 MB in fp32 at 8 x 512", "arithmetic: 8 x 512 positions x 49,152 words x 4 bytes"),
    ("checklist.md", r"sqrt\(0\.81 x 0\.19 / 400\) = 0\.020", "arithmetic: the binomial standard error"),
    ("checklist.md", r"0\.020 / sqrt\(3\) = 0\.012", "arithmetic: the standard error of a 3-seed mean"),
    ("checklist.md", r"under 15\s+minutes", "a target, not a measurement"),
    ("checklist.md", r"Why 0\.75|to 0\.75|chance is 0\.50|old bar, 0\.80", "the bar of this item, not a measurement"),
    ("benchmarks/RESULTS.md", r"3 x 418 MB", "arithmetic: 109.5M frozen parameters x 4 bytes"),
]

NUMBER = re.compile(r"""
    (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)
    (?:e(?P<exp>[-+]?\d+))?
    (?P<suffix>x|%|M)?
    (?:[ ]?(?P<unit>ms|s|min|minutes|hours|MB|GB|GiB|KB|rows/s|samples/s|tokens/s)(?![\w/]))?
""", re.X)
NAME_WORDS = re.compile(r"(?:torch|transformers|peft|python|datasets|safetensors|cuda|version|section)\s*$", re.I)
TARGET_WORDS = re.compile(r"(?:at least|at most|<=|>=)\s*$", re.I)
CONFIG_WORDS = re.compile(r"(?:dropout|lr|learning rate|warmup|weight decay|alpha|rank|r ?=|batch(?: size)?|"
                          r"seeds?|epochs?)\s*$", re.I)
SETTING_AFTER = re.compile(r"\s*(?:warmup|dropout|weight decay)\b", re.I)
ANNOTATION = re.compile(r"^\s*<!--\s*results:\s*(?P<sources>.*?)\s*-->\s*$")
END = re.compile(r"^\s*<!--\s*end results\s*-->\s*$")


class Figure:
    def __init__(self, text, value, decimals, suffix, unit, plain, bare_exp, line, col, cell):
        self.text, self.value, self.decimals, self.suffix, self.unit = text, value, decimals, suffix, unit
        self.plain, self.bare_exp, self.line, self.col, self.cell = plain, bare_exp, line, col, cell

    @property
    def checked(self):
        """A figure the block's sources must back: anything but a plain count or a bare power of ten."""
        return not self.plain and not self.bare_exp

    @property
    def looks_measured(self):
        if not self.checked or self.suffix == "M":
            return False
        return bool(self.unit or self.suffix in ("x", "%") or self.decimals >= 2)

    @property
    def operand(self):
        """Usable in a ratio or difference: a checked figure without x or %, or a count written with commas."""
        return self.suffix not in ("x", "%") and (self.checked or self.value >= 1000)

    def tolerance(self):
        return 0.5 * 10.0 ** -self.decimals * (1 + 1e-9) + 1e-12 * abs(self.value)

    def matches(self, value):
        """A computed value (a ratio, a difference): equal within half a unit of the last printed digit."""
        return abs(self.value - value) <= self.tolerance()

    def prints(self, value):
        """A value from a file: rounded half up to the printed decimals, as the file writes it (0.7375 -> 0.738,
        15.645 -> 15.65), it is the printed figure."""
        if not math.isfinite(value) or abs(self.value - value) > 1.01 * self.tolerance():
            return False
        places = Decimal(1).scaleb(-self.decimals)
        shown = Decimal(repr(self.value)).quantize(places, rounding=ROUND_HALF_UP)
        try:
            return shown == Decimal(repr(value)).quantize(places, rounding=ROUND_HALF_UP)
        except InvalidOperation:
            return False

    def __repr__(self):
        return f"{self.text!r} (line {self.line})"


def _blank(text, pattern):
    return re.sub(pattern, lambda m: " " * len(m.group(0)), text)


def visible_text(line):
    """The line as a reader sees numbers in it: inline code, link targets and HTML comments blanked out."""
    line = _blank(line, r"`[^`]*`")
    line = _blank(line, r"\]\([^)]*\)")
    line = _blank(line, r"<!--.*?-->")
    return line.replace("**", "  ")


def figures_in_line(line, line_no, doc, table_row=False):
    """Every figure of one line (see the module docstring for what counts), with its table column if any."""
    text = visible_text(line)
    for allowed_doc, pattern, _ in ALLOWED:
        if allowed_doc == doc:
            text = _blank(text, pattern)
    found = []
    for m in NUMBER.finditer(text):
        start, end = m.start(), m.end()
        before = text[:start]
        if before and (before[-1].isalnum() or before[-1] in "_.^"):
            continue  # part of a word or a name: fp32, Q10, H100, v2, e^2
        if before and before[-1] in "-/+":
            word = re.search(r"[\w.]*$", before[:-1]).group(0)
            if re.search(r"[A-Za-z]", word):
                continue  # GPT-2, SmolLM2-135M, ViT-B/16, 2.11.0+cu130
        if re.match(r"\.\d|\w", text[end:]) and not m.group("unit"):
            continue  # a version (2.13.0), a name (01eb94a, 3rd) or a shape (1024x768)
        if NAME_WORDS.search(before) or TARGET_WORDS.search(before):
            continue  # torch 2.13, Section 7.1; at least 0.75, <= 0.45x
        num, exp, suffix, unit = m.group("num"), m.group("exp"), m.group("suffix"), m.group("unit")
        if CONFIG_WORDS.search(before) and not unit and suffix not in ("x", "%") or SETTING_AFTER.match(text[end:]):
            continue  # a setting: dropout 0.05, lr 1e-3, r = 8, 10% warmup
        decimals = len(num.split(".")[1]) if "." in num else 0
        value = float(num.replace(",", ""))
        if exp:
            value *= 10.0 ** int(exp)
            decimals -= int(exp)
        plain = "." not in num and not exp and not suffix and not unit
        bare_exp = bool(exp) and "." not in num
        cell = text[:start].count("|") if table_row else None
        found.append(Figure(m.group(0).strip(), value, decimals, suffix, unit, plain, bare_exp, line_no, start, cell))
    return found


# ---------------------------------------------------------------------------------------------- result files

class Entry:
    """One number a result file offers, with where it lies (json path; the part of a json object it belongs to)."""
    __slots__ = ("value", "path", "ratio")

    def __init__(self, value, path, ratio=False):
        self.value, self.path, self.ratio = float(value), path, ratio


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers_in_string(text):
    pattern = r"(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
    return [float(n.replace(",", "")) for n in re.findall(pattern, text)]


def _aggregates(values):
    values = [v for v in values if _is_number(v)]
    if len(values) < 2:
        return []
    return [min(values), max(values), statistics.mean(values), statistics.median(values), sum(values),
            statistics.stdev(values)]


def _walk(node, path, out, objects):
    if isinstance(node, bool) or node is None:
        return
    if _is_number(node):
        out.append(Entry(node, path))
    elif isinstance(node, str):
        out.extend(Entry(v, path) for v in _numbers_in_string(node))
    elif isinstance(node, list):
        out.extend(Entry(v, path + ("*",)) for v in _aggregates(node))
        for i, item in enumerate(node):
            _walk(item, path + (i,), out, objects)
    elif isinstance(node, dict):
        objects.add(path)
        for group in ([c for c in node.values() if isinstance(c, dict)],  # layers, methods: keyed objects
                      *[c for c in node.values() if isinstance(c, list) and c and
                        all(isinstance(r, dict) for r in c)]):  # rows, runs
            if len(group) >= 2:
                for key in sorted(set().union(*group), key=str):
                    out.extend(Entry(v, path + ("*", key)) for v in _aggregates([c.get(key) for c in group]))
        scalars = [v for v in node.values() if _is_number(v)]
        out.extend(Entry(a / b, path + ("*ratio",), ratio=True)
                   for i, a in enumerate(scalars) for j, b in enumerate(scalars) if i != j and b)
        for key, child in node.items():
            _walk(child, path + (key,), out, objects)


@functools.lru_cache(maxsize=None)
def source_entries(source, index=0):
    """The numbers a source offers (`path` or `path#key.key`, a part of a json file), and the paths of its objects."""
    path, _, part = source.partition("#")
    full = os.path.join(ROOT, path)
    if not any(path.startswith(d) for d in RESULT_DIRS):
        raise ValueError(f"{source} is not a committed result file (those lie in {', '.join(RESULT_DIRS)})")
    if not os.path.isfile(full):
        raise ValueError(f"{source}: no such file")
    if path.endswith(".json"):
        node = json.load(open(full))
        for key in filter(None, part.split(".")):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"{source}: no key {key!r}")
            node = node[key]
    else:
        if part:
            raise ValueError(f"{source}: only json files have parts")
        node = open(full, encoding="utf-8").read()
    out, objects = [], {(index,)}
    _walk(node, (index,), out, objects)
    return out, objects


def config_values():
    """Every number in config.yaml and configs/*.yaml: settings, not measurements."""
    import yaml
    out = set()
    for path in [os.path.join(ROOT, "config.yaml")] + sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        stack = [yaml.safe_load(open(path))]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif _is_number(node):
                out.add(float(node))
    return out


# ------------------------------------------------------------------------------------------------- matching

def conversions(figure, entry):
    """The entry's number in the figure's unit (a few candidates)."""
    v = entry.value
    if entry.ratio and figure.suffix not in ("x", "%"):
        return []
    if figure.suffix == "%":
        return [v * 100] if entry.ratio else [v, v * 100]  # a fraction, or already a percentage
    if figure.suffix == "M":
        return [v / 1e6]
    out = [v]
    if figure.unit == "MB":
        out += [v / 2 ** 20, v / 1e6]
    elif figure.unit in ("GB", "GiB"):
        out += [v / 1024, v / 1000, v / 2 ** 30, v / 1e9]
    elif figure.unit in ("min", "minutes"):
        out.append(v / 60)
    elif figure.unit == "hours":
        out.append(v / 3600)
    elif figure.unit == "ms":
        out.append(v * 1000)
    return out


def matching_entries(figure, sources):
    """The entries of the sources (a tuple) that the figure prints."""
    return _matching(figure.value, figure.decimals, figure.suffix, figure.unit, sources)


@functools.lru_cache(maxsize=None)
def _matching(value, decimals, suffix, unit, sources):
    figure = Figure("", value, decimals, suffix, unit, False, False, 0, 0, None)
    entries = [e for index, source in enumerate(sources) for e in source_entries(source, index)[0]]
    return [e for e in entries if any(figure.prints(c) for c in conversions(figure, e))]


def owner(path, objects):
    """The json object a number belongs to: its own object's fields, the lists in them, and their aggregates."""
    while path not in objects:
        path = path[:-1]
    return path


def row_records(others, source, objects):
    """A table row's records in one source: the deepest json objects holding a match of each of the row's other
    figures that match in the source at all (the whole source when none does)."""
    common = None
    for other in others:
        holders = {owner(e.path, objects)[:k] for e in other if e.path[0] == source
                   for k in range(1, len(owner(e.path, objects)) + 1)}
        if holders:
            common = holders if common is None else common & holders
    common = [p for p in common or () if p in objects] or [(source,)]
    depth = max(len(p) for p in common)
    return [p for p in common if len(p) == depth]


def in_row_record(matches, others, n_sources, objects):
    """Does the figure match inside its table row's record, in one of the sources? Either inside a row record,
    or among the own fields of a json object that has as many of the row's other figures among its own fields as
    any object has (a row of medians and ranges over layers: the layers' parent holds them as aggregates)."""
    for source in range(n_sources):
        records = row_records(others, source, objects)
        if any(e.path[0] == source and e.path[:len(r)] == r for e in matches for r in records):
            return True
        counts = {}
        for other in others:
            for o in {owner(e.path, objects) for e in other if e.path[0] == source}:
                counts[o] = counts.get(o, 0) + 1
        best = max(counts.values(), default=0)
        if best and any(e.path[0] == source and counts.get(owner(e.path, objects)) == best for e in matches):
            return True
    return False


def derived(figure, operands, differences=True):
    """A ratio ("x"), percentage or difference of two numbers with the same unit, printed or matched beside it."""
    if figure.suffix == "x" and figure.matches(1.0):
        return True  # the baseline of a ratio column
    if figure.suffix is None and not differences:
        return False
    pairs = [(a, b) for a, ua in operands for b, ub in operands if ua == ub and a != b and b]
    for a, b in pairs:
        r = a / b
        if figure.suffix == "x" and figure.matches(r):
            return True
        if figure.suffix == "%" and any(figure.matches(c) for c in (r * 100, (r - 1) * 100, (1 - r) * 100)):
            return True
        if figure.suffix is None and figure.matches(abs(a - b)):
            return True
    return False


# --------------------------------------------------------------------------------------------------- blocks

def _block_after(lines, i):
    """Line indices of the block that starts after line i (blank lines skipped)."""
    k = i + 1
    while k < len(lines) and not lines[k].strip():
        k += 1
    if k >= len(lines):
        return []
    item = re.compile(r"\s*(?:[-*]|\d+\.)\s")
    if lines[k].lstrip().startswith("|"):
        end = k
        while end < len(lines) and lines[end].lstrip().startswith("|"):
            end += 1
    elif item.match(lines[k]):
        end = k + 1
        while end < len(lines) and lines[end].strip() and lines[end][:1].isspace() and not item.match(lines[end]):
            end += 1
    else:
        end = k
        while end < len(lines) and lines[end].strip() and not re.match(r"\s*(?:\||#|```|<!--)", lines[end]) \
                and not item.match(lines[end]):
            end += 1
    return list(range(k, end))


def parse_doc(doc, lines=None):
    """The doc's lines, its covered blocks [(annotation line index, sources, covered line indices)], its code lines."""
    if lines is None:
        lines = open(os.path.join(ROOT, doc), encoding="utf-8").read().splitlines()
    code, in_code = set(), False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            code.add(i)
        elif in_code:
            code.add(i)
    openers = [i for i, line in enumerate(lines) if i not in code and ANNOTATION.match(line)]
    blocks = []
    for n, i in enumerate(openers):
        sources = [s for s in re.split(r"[,\s]+", ANNOTATION.match(lines[i]).group("sources")) if s]
        limit = openers[n + 1] if n + 1 < len(openers) else len(lines)
        end = next((j for j in range(i + 1, limit) if END.match(lines[j])), None)
        covered = list(range(i + 1, end)) if end is not None else _block_after(lines, i)
        blocks.append((i, sources, [j for j in covered if j not in code]))
    return lines, blocks, code


def _groups(lines, covered):
    """Records of a covered block: each table row, and each paragraph (consecutive non-table lines)."""
    groups, current = [], []
    for j in covered:
        row = lines[j].lstrip().startswith("|")
        if row or not lines[j].strip():
            if current:
                groups.append(current)
            current = []
            if row and not re.match(r"\s*\|[-:| ]+\|\s*$", lines[j]):
                groups.append([j])
        else:
            current.append(j)
    if current:
        groups.append(current)
    return groups


def check_block(doc, lines, sources, covered):
    """(a) for one covered block: the problems, and the figures it checked."""
    objects, problems, named = set(), [], ", ".join(sources)
    sources = tuple(f"{name}#{part}".rstrip("#") for source in sources for name, _, parts in [source.partition("#")]
                    for part in parts.split("+"))  # file#a+b: two sources, the parts a and b of one file
    for index, source in enumerate(sources):
        try:
            objects |= source_entries(source, index)[1]
        except ValueError as error:
            problems.append(f"{doc}:{covered[0] + 1}: the comment 'results: ...' names {error}")
    if problems:
        return problems, []
    is_row = {j: lines[j].lstrip().startswith("|") for j in covered}
    figures = {j: figures_in_line(lines[j], j + 1, doc, is_row[j]) for j in covered}
    every = [f for j in covered for f in figures[j]]
    matches = {id(f): matching_entries(f, sources) for f in every if f.checked}
    group_of = {id(f): tuple(g) for g in _groups(lines, covered) for j in g for f in figures[j]}
    unmatched = []
    for f in every:
        if not f.checked:
            continue
        group = [g for j in group_of[id(f)] for g in figures[j] if g is not f and g.checked]
        if is_row[f.line - 1]:
            if in_row_record(matches[id(f)], [matches[id(g)] for g in group], len(sources), objects):
                continue
        elif matches[id(f)]:
            continue
        if is_row[f.line - 1]:
            near = [g for g in every if g.line == f.line or (g.cell == f.cell and is_row[g.line - 1])]
        else:
            near = every
        near = [g for g in near if g is not f and g.operand]
        operands = [(g.value, g.unit) for g in near]  # as printed, and as the file has them (unrounded)
        operands += [(e.value, g.unit) for g in near if g.checked for e in matches[id(g)][:1]
                     if not e.ratio and g.prints(e.value)]
        if derived(f, operands, differences=not is_row[f.line - 1]):
            continue
        unmatched.append(f)
    for f in unmatched:
        problems.append(f"{doc}:{f.line}: {f.text} is not in {named} (not its row's or paragraph's "
                        f"value rounded to {max(f.decimals, 0)} decimals, nor a ratio or difference of the figures "
                        f"beside it): {WHAT_TO_DO}")
    checked = [f for f in every if f.checked]
    if not checked and not problems:
        problems.append(f"{doc}:{covered[0] + 1}: the comment 'results: {named}' covers no figure: "
                        f"move it to the table or paragraph whose figures come from it, or remove it")
    return problems, checked


def check_doc(doc, config=None, lines=None):
    """All problems of one doc ((a) and (b)), and the figures it checked."""
    config = config_values() if config is None else config
    lines, blocks, code = parse_doc(doc, lines)
    problems, checked, covered_lines = [], [], set()
    for opener, sources, covered in blocks:
        covered_lines.update(covered)
        if not covered:
            problems.append(f"{doc}:{opener + 1}: the comment 'results: ...' is not followed by a table or paragraph")
            continue
        p, c = check_block(doc, lines, sources, covered)
        problems += p
        checked += c
    for i, line in enumerate(lines):
        if i in code or i in covered_lines:
            continue
        for f in figures_in_line(line, i + 1, doc, line.lstrip().startswith("|")):
            if f.looks_measured and not (f.value in config and not f.unit):
                problems.append(f"{doc}:{i + 1}: {f.text} looks measured, but no '<!-- results: FILE -->' comment "
                                f"covers this line: put one naming its committed result file before the table or "
                                f"paragraph, or {UNMEASURED} (rules: tests/doc_numbers.py)")
    return problems, checked


# ------------------------------------------------------------------------------------------- self-check

def mutations(text):
    """The figure with its last digit changed by one up and one down: the drift the check must catch."""
    i = max(k for k, ch in enumerate(text) if ch.isdigit())
    digit = int(text[i])
    return [text[:i] + str(d) + text[i + 1:] for d in sorted({(digit + 1) % 10, (digit - 1) % 10})]


def missed_mutations(doc):
    """For every checked figure of the doc, the one-digit changes the check does NOT catch; and how many were tried."""
    lines, blocks, _ = parse_doc(doc)
    missed, tried = [], 0
    for _, sources, covered in blocks:
        is_row = {j: lines[j].lstrip().startswith("|") for j in covered}
        for f in [f for j in covered for f in figures_in_line(lines[j], j + 1, doc, is_row[j]) if f.checked]:
            line = lines[f.line - 1]
            starts = [k for k in range(len(line)) if line.startswith(f.text, k)]
            start = min(starts, key=lambda k: abs(k - f.col))
            for new in mutations(f.text):
                tried += 1
                changed = list(lines)
                changed[f.line - 1] = line[:start] + new + line[start + len(f.text):]
                problems, _ = check_block(doc, changed, sources, covered)
                if not any(p.startswith(f"{doc}:{f.line}: {new} ") for p in problems):
                    missed.append(f"{doc}:{f.line}: {f.text} -> {new}")
    return missed, tried
