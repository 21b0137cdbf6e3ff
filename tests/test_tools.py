"""test_installation.py and `utils.py compare_ranks`."""
import test_installation
import train_lora_basic
import utils


def test_installation_check_passes_here(capsys):
    assert test_installation.main() == 0
    out = capsys.readouterr().out
    assert "All tests passed!" in out and "[FAIL]" not in out and "package torch" in out


def test_installation_check_names_the_fix(monkeypatch, capsys):
    monkeypatch.setattr(test_installation, "REQUIRED", [("no_such_module_xyz", "no-such-dist", "1.0"),
                                                         ("torch", "torch", "99.0")])
    assert test_installation.main() == 1
    out = capsys.readouterr().out
    assert "[FAIL] package no-such-dist" in out and "pip install -r requirements.txt" in out
    assert "older than 99.0" in out and "All tests passed!" not in out


def test_compare_ranks_tables_a_rank_sweep(tiny_assets, tmp_path, capsys):
    results = tmp_path / "results"
    for rank in (4, 2):
        assert train_lora_basic.main(["--model", tiny_assets["bert"], "--train_file", tiny_assets["train_csv"],
                                      "--validation_file", tiny_assets["validation_csv"], "--rank", str(rank),
                                      "--max_steps", "3", "--max_length", "32", "--device", "cpu",
                                      "--output_dir", str(results / f"rank_{rank}")]) == 0
    (results / "broken").mkdir()
    (results / "broken" / "training_metrics.json").write_text("{ truncated")
    capsys.readouterr()
    assert utils.main(["compare_ranks", "--results_dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "broken" in out and "varying: rank" in out
    rows = [line for line in out.splitlines() if line.startswith("rank_")]
    assert [r.split()[0] for r in rows] == ["rank_2", "rank_4"]  # sorted by the field that varies
    trainable = [int(r.split()[4].replace(",", "")) for r in rows]
    assert trainable[1] - 2 * 2 * 4 * 64 == trainable[0] - 2 * 2 * 2 * 64  # same head, LoRA scales with rank
    assert (results / "comparison_rank.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_ranks_on_an_empty_or_missing_folder_exits_2(tmp_path, capsys):
    assert utils.main(["compare_ranks", "--results_dir", str(tmp_path)]) == 2
    assert "no training_metrics.json found" in capsys.readouterr().err
    assert utils.main(["compare_ranks", "--results_dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
