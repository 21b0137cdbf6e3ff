"""Tiny random models (seconds, no network) shared by the tests."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

VOCAB = 100


def tiny_bert(num_labels=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def model_output(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_lora_B(model, seed=1, std=0.1):
    """Give every B a non-zero value so that LoRA actually changes the model."""
    from lora_linear import lora_layers
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora.lora_B.copy_(torch.randn(layer.lora.lora_B.shape, generator=gen) * std)


def saved_peft_adapter(model, config, folder):
    """A PEFT LoRA model with random B (so the adapter does something), saved by PEFT; returns the model."""
    import peft
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    peft_model.eval().save_pretrained(folder)
    return peft_model


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- tiny end-to-end assets
# Test-only data: a toy sentiment task whose label is decided by the words in it, so a few steps of
# training can show the loss going down. It is not presented as real data anywhere.
POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["the", "movie", "film", "plot", "was", "really", "acting", "and", "quite", "story", "a", "very"]


def toy_sentences(n, seed):
    import random
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(FILLER, k=rng.randint(2, 8)) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tiny_tokenizer(folder):
    from transformers import BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER
    os.makedirs(folder, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, eos_token="[SEP]")
    tokenizer.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Folders with a tiny random BERT and GPT-2 (plus tokenizer) and toy csv/txt data."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for name in ("bert", "gpt2"):
        folder = str(root / name)
        vocab = write_tiny_tokenizer(folder)
        torch.manual_seed(0)
        if name == "bert":
            model = BertForSequenceClassification(BertConfig(
                vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.2))
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                               bos_token_id=3, eos_token_id=3, initializer_range=0.2))
        model.save_pretrained(folder)
        paths[name] = folder
    import csv
    for split, n, seed in (("train", 192, 1), ("validation", 64, 2)):
        path = root / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            writer.writerows(toy_sentences(n, seed))
        paths[f"{split}_csv"] = str(path)
        (root / f"{split}.txt").write_text("\n".join(s for s, _ in toy_sentences(n * 4, seed)) + "\n\n")
        paths[f"{split}_txt"] = str(root / f"{split}.txt")
    return paths


@pytest.fixture(scope="session")
def tiny_runs(tiny_assets, tmp_path_factory):
    """Adapters trained for a few steps on the tiny models: {'bert': dir, 'gpt2': dir}."""
    import train_lora_basic
    root = tmp_path_factory.mktemp("runs")
    common = ["--max_length", "32", "--device", "cpu", "--max_steps", "6", "--lr", "1e-2"]
    assert train_lora_basic.main(["--model", tiny_assets["bert"], "--train_file", tiny_assets["train_csv"],
                                  "--validation_file", tiny_assets["validation_csv"],
                                  "--output_dir", str(root / "bert"), *common]) == 0
    assert train_lora_basic.main(["--model", tiny_assets["gpt2"], "--task", "causal_lm", "--target_modules", "c_attn",
                                  "--train_file", tiny_assets["train_txt"], "--validation_file",
                                  tiny_assets["validation_txt"], "--output_dir", str(root / "gpt2"), *common]) == 0
    return {"bert": str(root / "bert"), "gpt2": str(root / "gpt2")}


# --------------------------------------------------------------------------- a seeded Hugging Face cache
# Tiny random models saved under the real Hub ids `gpt2` and `bert-base-uncased`, with real tokenizer types
# (a byte-level BPE GPT2TokenizerFast, a WordPiece BertTokenizerFast), laid out as huggingface_hub caches
# them. With HF_HUB_OFFLINE=1 and HF_HOME pointing here, transformers loads them as `gpt2` and
# `bert-base-uncased`: the real, non-fallback code path (GPT-2's Conv1D and c_attn included) runs in CI.
def _cache_snapshot(hub_dir, repo_id, save):
    sha = "0" * 40
    repo = os.path.join(hub_dir, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", sha)
    os.makedirs(snapshot)
    save(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(sha)


def tiny_bpe_gpt2_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    """An HF_HOME whose hub cache holds tiny random `gpt2` and `bert-base-uncased`."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel
    home = tmp_path_factory.mktemp("hf_home")
    hub = str(home / "hub")
    texts = [s for s, _ in toy_sentences(400, 3)]
    gpt2_tokenizer = tiny_bpe_gpt2_tokenizer(texts)

    def save_gpt2(folder):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tokenizer), n_embd=32, n_layer=2, n_head=4,
                                           n_positions=512, bos_token_id=0, eos_token_id=0, initializer_range=0.2))
        model.save_pretrained(folder)
        gpt2_tokenizer.save_pretrained(folder)

    def save_bert(folder):
        vocab = write_tiny_tokenizer(folder)
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=512,
                                   initializer_range=0.2)).save_pretrained(folder)

    _cache_snapshot(hub, "gpt2", save_gpt2)
    _cache_snapshot(hub, "bert-base-uncased", save_bert)
    return str(home)
