"""GUIDE.md quotes the library: every quoted method must still be in lora_linear.py, word for word."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_guide_code_quotes_match_the_library():
    guide = open(os.path.join(ROOT, "GUIDE.md")).read()
    source = open(os.path.join(ROOT, "lora_linear.py")).read()
    quoted = [block for block in re.findall(r"```python\n(.*?)```", guide, re.S) if block.startswith("    ")]
    assert len(quoted) >= 3  # LoRALayer.forward, LinearWithLoRA.forward, merge_weights
    for block in quoted:
        assert block in source, f"GUIDE.md quotes code that is no longer in lora_linear.py:\n{block}"


def test_documented_experiment_and_benchmark_commands_exist():
    import sys
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench
    import run
    docs = "".join(open(os.path.join(ROOT, name)).read() for name in
                   ("README.md", "discussion.md", "benchmarks/RESULTS.md", "experiments/run.py"))
    commands = set(re.findall(r"experiments/run\.py (\w+)", docs))
    sections = {s for group in re.findall(r"bench\.py --only ((?:\w+ ?)+)", docs) for s in group.split()}
    assert commands and sections
    assert commands <= set(run.COMMANDS), commands - set(run.COMMANDS)
    assert sections <= set(bench.SECTIONS), sections - set(bench.SECTIONS)


def test_readme_and_guide_quote_the_bert_base_parameter_counts():
    """bert-base-uncased (BertConfig() defaults, 2 labels), LoRA r=8 on query and value, counted on the meta device."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from lora_linear import apply_lora_to_model, count_lora_parameters, mark_only_lora_as_trainable
    with torch.device("meta"):
        bert = BertForSequenceClassification(BertConfig(num_labels=2))
    counts = count_lora_parameters(mark_only_lora_as_trainable(apply_lora_to_model(bert, ["query", "value"], rank=8)))
    readme = open(os.path.join(ROOT, "README.md")).read()
    guide = open(os.path.join(ROOT, "GUIDE.md")).read()
    head = counts["trainable"] - counts["lora"]
    for number in (counts["lora"], head, counts["frozen"]):
        assert f"{number:,}" in readme, f"README.md does not quote {number:,}"
    for number in (counts["total"], counts["trainable"], counts["lora"], head, counts["frozen"]):
        assert f"{number:,}" in guide, f"GUIDE.md does not quote {number:,}"
    assert f"{counts['percentage']:.2f}%" in readme and f"{counts['percentage']:.3f}" in guide


def test_guide_names_only_functions_that_exist():
    """Every `module.name` in GUIDE.md is defined in that module, and every other `snake_case` name it quotes
    appears in the code or the tests (a function, class, attribute, key, or a model's layer name such as GPT-2's
    c_fc, which the tests build): a renamed function fails here."""
    import ast
    import glob
    guide = open(os.path.join(ROOT, "GUIDE.md")).read()
    prose = re.sub(r"```.*?```", "", guide, flags=re.S)
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py")) + \
        glob.glob(os.path.join(ROOT, "tests", "*.py"))  # GUIDE cites tests by name too
    defined, source = {}, ""
    for path in files:
        text = open(path).read()
        source += text
        module = os.path.splitext(os.path.basename(path))[0]
        tree = ast.parse(text)
        defined[module] = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined[module] |= {target.id for node in tree.body if isinstance(node, ast.Assign)
                            for target in node.targets if isinstance(target, ast.Name)}
    classes = {name for names in defined.values() for name in names if name[:1].isupper()}
    quoted = re.findall(r"`([A-Za-z_][\w.]*)(?:\(.*?\))?`", prose)
    checked = 0
    for name in quoted:
        module, _, attribute = name.rpartition(".")
        if attribute in ("py", "md", "json", "yaml", "txt", "png"):  # a file name
            continue
        if module in defined and attribute:
            assert attribute in defined[module], f"GUIDE.md names {name}, which {module}.py does not define"
            checked += 1
        elif module in classes:  # Class.method
            assert re.search(rf"def {attribute}\b", source), f"GUIDE.md names {name}, which is defined nowhere"
            checked += 1
        elif "_" in name and "." not in name and not name.endswith(("_py", ".py")):
            assert re.search(rf"\b{re.escape(name)}\b", source), f"GUIDE.md names `{name}`, found nowhere in the code"
            checked += 1
    assert checked >= 30
