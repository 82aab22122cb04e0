"""ablations.py on a synthetic LFW with budgets of seconds: every output written, verdicts
decided by the interval alone, the ResNeXt rows listed as not run without ImageNet weights."""
import json
import shutil
from pathlib import Path

import pytest

import ablations
import dataset as ds
from conftest import small_lfw

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("expect, low, high, verdict", [
    ("better", 0.01, 0.05, "holds"),
    ("better", -0.05, -0.01, "does not hold"),
    ("better", -0.01, 0.05, "inconclusive"),      # a straddling interval is never a win
    ("not better", -0.05, -0.01, "holds"),
    ("not better", 0.01, 0.05, "does not hold"),
    ("not better", -0.05, 0.0, "inconclusive"),
    ("no effect", -0.02, 0.02, "inconclusive"),    # no effect cannot be shown by 1,000 pairs
    ("no effect", 0.01, 0.03, "does not hold"),
    ("no effect", -0.03, -0.01, "does not hold"),
    (None, 0.01, 0.03, "no claim"),
])
def test_the_interval_alone_decides_the_verdict(expect, low, high, verdict):
    assert ablations.verdict(expect, low, high) == verdict


def test_every_row_names_known_runs_and_an_expectation():
    ids = [r[0] for r in ablations.ROWS]
    assert len(ids) == len(set(ids))
    assert {"1", "2", "3", "4a", "4b", "5", "6", "7", "8", "9", "10", "11a", "11b", "12", "13",
            "14", "15"} <= set(ids)
    for rid, claim, base, variant, expect in ablations.ROWS:
        assert base in ablations.RUNS and variant in ablations.RUNS and base != variant, rid
        assert expect in ("better", "not better", "no effect", None), rid
    # The ResNeXt rows, and only they, need ImageNet weights; no row trains ResNeXt from scratch.
    resnext = {r[0] for r in ablations.ROWS if ablations.needs_imagenet(r[3])}
    assert resnext == {"12", "13", "14", "15"}
    for name, (recipe, overrides, budget) in ablations.RUNS.items():
        assert ("--model=resnext" in overrides) == ablations.needs_imagenet(name), name
    assert ablations.change({"base": "seed", "variant": "seed-lr1e-3"}) == "`--lr=1e-3`"
    assert ablations.change({"base": "seed", "variant": "seed-long"}) == "3x the budget"


def test_the_training_pairs_are_the_runs_own_people_in_lfw_format(tmp_path):
    train, test = small_lfw(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"protocol_dir": str(tmp_path), "seed": 0, "val_fraction": 0.25, "val_pairs": 20,
           "slice_of_data": 0}
    (run / "config.json").write_text(json.dumps({"config": cfg}))
    path = ablations.train_pairs_file(run, tmp_path / "images", tmp_path / "pairs.txt")
    pairs = ds.parse_pairs(path)
    assert len(pairs) == ablations.TRAIN_PAIRS and sum(p[4] for p in pairs) == len(pairs) // 2
    split = ds.make_split(tmp_path / "images", tmp_path, "view1", 0, 0.25, 20)
    people = {name for p in pairs for name in (p[0], p[2])}
    assert people <= set(split["train"])  # neither validation nor test people
    assert all((p[0], p[1]) != (p[2], p[3]) for p in pairs)  # never an image with itself


def test_ablation_smoke_writes_every_output_and_resumes(tmp_path, monkeypatch):
    small_lfw(tmp_path / "lfw")
    monkeypatch.setattr(ablations, "imagenet_weights_file", lambda: tmp_path / "absent.pth")
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "RECIPE.md", docs / "RECIPE.md")
    out = tmp_path / "results"
    args = ["--rows", "7,10,12", "--minutes", "0.02", "--out", out, "--data-root", tmp_path / "lfw",
            "--crops", tmp_path / "lfw" / "images", "--logs", tmp_path / "logs", "--docs", docs,
            "--train-args", "--val_pairs=20 --val_fraction=0.25 --threads=1 --batch_size=16 "
                            "--pairs_per_epoch=64 --torch_compile=False --embedding_dim=32"]
    assert ablations.main([str(a) for a in args]) == 0
    result = json.loads((out / "ablations.json").read_text())
    assert [r["id"] for r in result["rows"]] == ["7", "10", "12"]
    assert set(result["runs"]) == {"seed", "seed-photos", "best", "best-l1"}
    for row in result["rows"][:2]:
        assert row["verdict"] in ("holds", "does not hold", "inconclusive")
        assert row["low"] <= row["difference"] <= row["high"]
    assert result["rows"][2]["verdict"] == "not run: needs ImageNet weights"
    for r in result["runs"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1
        assert r["contaminated"] is False  # DevTest people are never trained on
    assert result["runs"]["best-l1"]["overrides"] == ["--distance=l1"]
    assert (out / "ablations.png").stat().st_size > 1000
    table = (out / "ablations.md").read_text()
    assert table in (docs / "RECIPE.md").read_text()
    assert "| 12 | ResNeXt-50" in table and "not run" in table
    # A second run trains nothing again, and --tables-only rewrites the table from the JSON.
    state = (out / "cache" / "state.json").read_text()
    assert ablations.main([str(a) for a in args]) == 0
    assert (out / "cache" / "state.json").read_text() == state
    (out / "ablations.md").unlink()
    assert ablations.main(["--tables-only", "--out", str(out), "--docs", ""]) == 0
    assert (out / "ablations.md").read_text() == table


def test_unknown_rows_and_missing_data_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no row 99"):
        ablations.main(["--rows", "1,99", "--data-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="make it with `make data`"):
        ablations.main(["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
