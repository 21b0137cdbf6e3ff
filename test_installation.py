"""
Check that this machine can run the repo:  python test_installation.py

Prints each check, then "All tests passed!" (exit 0) or, for each failure, what failed and the command
that fixes it (exit 1). Runs offline in a few seconds.
"""

import importlib
import importlib.metadata as metadata
import sys

FIX_INSTALL = "pip install -r requirements.txt"
REQUIRED = [  # (import name, distribution name, minimum version)
    ("torch", "torch", "2.0"), ("transformers", "transformers", "5.0"), ("datasets", "datasets", "5.0"),
    ("safetensors", "safetensors", "0.4"), ("yaml", "PyYAML", "5.0"), ("tqdm", "tqdm", "4.0"),
    ("matplotlib", "matplotlib", "3.0"), ("tensorboard", "tensorboard", "2.0"), ("psutil", "psutil", "5.0"),
    ("gguf", "gguf", "0.10"),
]


def _version_tuple(text):
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def check_python() -> str:
    """The Python version; RuntimeError if it is older than 3.9."""
    if sys.version_info < (3, 9):
        raise RuntimeError(f"Python {sys.version.split()[0]} is too old; install Python 3.9 or newer")
    return sys.version.split()[0]


def check_package(module: str, distribution: str, minimum: str) -> str:
    """The installed version of `distribution`, once `module` imports; RuntimeError (with the fix) if it is
    missing, broken or older than `minimum`."""
    try:
        importlib.import_module(module)
        version = metadata.version(distribution)
    except Exception as e:
        raise RuntimeError(f"{distribution} is missing or broken ({type(e).__name__}); fix: {FIX_INSTALL}") from e
    if _version_tuple(version) < _version_tuple(minimum):
        raise RuntimeError(f"{distribution} {version} is older than {minimum}; fix: {FIX_INSTALL} --upgrade")
    return version


def check_device() -> str:
    """What will compute: CUDA (and whether it has bf16), Apple's MPS, or the CPU (threads, native bf16)."""
    import torch
    if torch.cuda.is_available():
        return f"CUDA ({torch.cuda.get_device_name(0)}, bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "MPS (Apple GPU)"
    from precision import cpu_has_native_bf16
    return f"CPU only ({torch.get_num_threads()} threads; native bf16 {'yes' if cpu_has_native_bf16() else 'no'})" \
           " - training works, more slowly"


def check_lora_layer() -> str:
    """A fresh LinearWithLoRA computes exactly its base layer (B starts at zero) and only LoRA gets gradients."""
    import torch
    from lora_linear import LinearWithLoRA
    layer = LinearWithLoRA(torch.nn.Linear(16, 8), rank=4, alpha=8)
    x = torch.randn(3, 16)
    if not torch.equal(layer(x), layer.base_layer(x)):
        raise RuntimeError("a fresh LoRA layer changed the output (B must start at zero)")
    layer(x).sum().backward()
    if layer.lora.lora_B.grad is None or layer.base_layer.weight.grad is not None:
        raise RuntimeError("gradients reached the frozen weight or missed LoRA")
    return "forward and backward ok"


def check_apply_and_merge() -> str:
    """LoRA on a tiny random BERT: the merged model (W0 + s B A) gives the unmerged model's outputs."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from lora_linear import apply_lora_to_model, count_lora_parameters, lora_layers, merge_lora_weights
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)).eval()
    apply_lora_to_model(model, ["query", "value"], rank=4)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora.lora_B, std=0.1)
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merge_lora_weights(model)
        after = model(input_ids=ids).logits
    if not torch.allclose(before, after, atol=1e-5):
        raise RuntimeError("merged and unmerged outputs differ")
    return f"{count_lora_parameters(model)['lora']} LoRA parameters, merge exact"


def main() -> int:
    """Run every check and print each result: exit status 0 if all pass, else 1 (every failure listed)."""
    checks = [("python", check_python)]
    checks += [(f"package {dist}", lambda m=mod, d=dist, v=low: check_package(m, d, v)) for mod, dist, low in REQUIRED]
    checks += [("device", check_device), ("LoRA layer", check_lora_layer), ("apply + merge", check_apply_and_merge)]
    failures = []
    for name, check in checks:
        try:
            print(f"[ok]   {name}: {check()}")
        except Exception as e:  # report every failure, not only the first
            failures.append(name)
            print(f"[FAIL] {name}: {e}")
    if failures:
        print(f"\n{len(failures)} check(s) failed: {', '.join(failures)}. Fix them with the commands above.")
        return 1
    print("\nAll tests passed!")
    return 0


if __name__ == "__main__":
    sys.exit(main())
