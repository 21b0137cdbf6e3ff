"""config.py is the one source of every default: config.yaml and README's option table must agree with it."""
import os
import re

import pytest
import yaml

from config import DEFAULT_CONFIG, LEAF_PATHS, ConfigError, check_value, leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_yaml_spells_out_every_default_as_it_is():
    with open(os.path.join(ROOT, "config.yaml")) as f:
        shipped = yaml.safe_load(f)
    checked = {name: check_value(name, value) for name, value in leaves(shipped).items()}
    assert checked == leaves(DEFAULT_CONFIG)
    assert set(checked) == set(LEAF_PATHS)


def readme_option_rows():
    """(line number, key names, default texts) of README's option table (| key | default | notes |)."""
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    start = lines.index("| key | default | notes |")
    rows = []
    for number, line in enumerate(lines[start + 2:], start + 3):
        if not line.startswith("|"):
            break
        keys_cell, defaults_cell = line.split("|")[1:3]
        keys_cell = re.sub(r"\(.*?\)", "", keys_cell)  # "(fp16, bf16)": shorthands, not listed defaults
        names = [name.split(".")[-1] for name in re.findall(r"`([\w.]+)`", keys_cell)]
        rows.append((number, names + (["splits"] if "splits" in keys_cell else []),
                     [d.strip() for d in defaults_cell.split(",")]))
    return rows


def same_value(text, value):
    if value is None:
        return text == "null"
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(text) == value
        except ValueError:
            return False
    return text == value


def test_readme_option_table_quotes_the_defaults():
    rows = readme_option_rows()
    assert len(rows) >= 15
    quoted = 0
    for number, names, defaults in rows:
        for name, text in zip(names, defaults):
            if name in LEAF_PATHS and not text.startswith("("):  # "(the model's)": decided at run time
                default = leaves(DEFAULT_CONFIG)[name]
                assert same_value(text, default), f"README.md line {number}: {name} is quoted as {text!r}, " \
                                                  f"but config.py's default is {default!r}"
                quoted += 1
    assert quoted >= 30


def test_readme_option_table_lists_every_key():
    """A key the table leaves out is a setting nobody reading the README can find."""
    named = {name for _, names, _ in readme_option_rows() for name in names}
    named |= {"train_split", "validation_split"} if "splits" in named else set()
    named |= {"fp16", "bf16"}  # the shorthands in the precision row: `training.precision` (`fp16`, `bf16`)
    missing = sorted(set(LEAF_PATHS) - named)
    assert not missing, f"README's option table lacks {missing}"


@pytest.mark.parametrize("name, value, message", [
    ("rank", 0, "an integer in [1,"), ("dropout", 1.0, "a number in [0, 1)"), ("warmup_ratio", 1.5, "[0, 1]"),
    ("learning_rate", 0, "a number > 0"), ("scaling", "linear", "one of standard, rslora, none"),
    ("precision", "fp8", "one of auto, fp32, bf16, fp16"), ("group_by_length", "maybe", "true or false"),
    ("validation_fraction", 0, "(0, 1)"), ("weight_decay", -1, ">= 0"), ("model_name", "", "non-empty")])
def test_each_key_is_checked_by_its_type_and_range(name, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_value(name, value)


def test_values_are_coerced_by_their_type():
    assert check_value("learning_rate", "5e-4") == 5e-4  # YAML 1.1 reads 5e-4 as a string
    assert check_value("batch_size", 8.0) == 8 and check_value("gradient_checkpointing", "yes") is True
    assert check_value("max_train_samples", "null") is None and check_value("offline_model", "none") is None
    assert check_value("scaling", "none") == "none"  # a choice named none stays a choice
    assert check_value("target_modules", "all") == "all" and check_value("target_modules", "c_attn") == ["c_attn"]
