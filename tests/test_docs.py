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
