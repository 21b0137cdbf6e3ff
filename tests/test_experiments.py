"""The experiment runner's own logic (its training runs are the integration tests' job, not repeated here)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_allocate_ranks_gives_the_budget_to_the_largest_singular_values():
    from run import allocate_ranks
    values = {"a": [9.0, 8.0, 7.0, 0.1], "b": [6.0, 0.2, 0.1, 0.0], "c": [0.5, 0.4, 0.3, 0.2]}
    # the 6 largest overall are 9, 8, 7 (a), 6 (b), 0.5, 0.4 (c)
    assert allocate_ranks(values, budget=6) == {"a": 3, "b": 1, "c": 2}
    # the minimum is kept even where a layer's values are all small, and the budget is spent exactly
    ranks = allocate_ranks(values, budget=6, minimum=2)
    assert ranks == {"a": 2, "b": 2, "c": 2}
    # ties and small values: 9, 8, 7, 6, 0.5, 0.4, 0.3, 0.2 (b), 0.2 (c) beat a's 0.1
    assert allocate_ranks(values, budget=9) == {"a": 3, "b": 2, "c": 4}


def test_save_writes_through_the_harness_with_the_seeds_in_the_header(tmp_path, monkeypatch):
    import json
    import run
    monkeypatch.setattr(run, "RESULTS", str(tmp_path))
    run.save("q0", {"budget": "tiny", "seeds": [42, 43], "rows": [{"accuracy_mean": 0.5}]})
    saved = json.loads((tmp_path / "q0.json").read_text())
    assert saved["seeds"] == [42, 43] and saved["budget"] == "tiny" and saved["rows"] == [{"accuracy_mean": 0.5}]
    assert saved["command"].startswith("python ") and {"git", "machine", "versions", "date_utc"} <= set(saved)


def test_q12_methods_train_what_they_say_and_leave_the_pretrained_vit_alone():
    """Each Q12 adaptation trains only its own parameters (a wrong set would make its row measure another
    method), and none of them changes the pretrained model that the next method starts from."""
    import torch
    from run import _adapt, _tiny_vit
    pretrained = _tiny_vit(0)
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    trainable = {m: {n for n, p in _adapt(m, pretrained, 1).named_parameters() if p.requires_grad}
                 for m in ("lora", "head", "full", "scratch")}
    assert trainable["head"] == {"classifier.weight", "classifier.bias"}
    lora = trainable["lora"] - trainable["head"]
    assert lora and all(".lora.lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in lora)
    assert trainable["full"] == trainable["scratch"] == {n for n, _ in pretrained.named_parameters()}
    assert all(torch.equal(v, pretrained.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in pretrained.parameters())
