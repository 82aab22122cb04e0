"""ablations.py on a synthetic LFW with budgets of seconds: every output written, verdicts
decided by the interval alone, the ResNeXt rows listed as not run without ImageNet weights."""
import json
import shutil
from pathlib import Path

import pytest

import ablations
import dataset as ds
import experiments
from conftest import small_lfw
from test_benchmark import BEST, SEED, assert_trains_as_before

ROOT = Path(__file__).resolve().parent.parent

# Every ablation run's settings while ablations.py's RUNS were lists of copies laid over the
# old `seed` copy and trainer2.py, written out by hand (View 1 DevTrain, --minutes 8).
SEED_RUN = {**SEED, "max_minutes": 8.0, "pairs_per_epoch": 4000}
BEST_RUN = {**BEST, "max_minutes": 8.0}
RESNEXT = {**BEST_RUN, "model": "resnext", "lr": 0.01, "pretrained": True}
OLD_RUNS = {
    "seed": SEED_RUN, "seed-long": {**SEED_RUN, "max_minutes": 24.0},
    "seed-wd1e-3": {**SEED_RUN, "weight_decay": 1e-3}, "seed-dropout": {**SEED_RUN, "p": 0.5},
    "seed-lr1e-3": {**SEED_RUN, "lr": 1e-3}, "seed-lr1e-5": {**SEED_RUN, "lr": 1e-5},
    "seed-small": {**SEED_RUN, "width": 32}, "seed-big": {**SEED_RUN, "width": 96},
    "seed-photos": {**SEED_RUN, "data_dir": "data/images"},
    "seed-residual": {**SEED_RUN, "model": "compact", "image_size": 112, "init": "kaiming"},
    "seed-augment": {**SEED_RUN, "augment_p": 1.0, "erase_p": 0.5},
    "best": BEST_RUN, "best-l1": {**BEST_RUN, "distance": "l1"},
    "best-bce": {**BEST_RUN, "loss": "bce", "distance": "l1"},
    "best-contrastive": {**BEST_RUN, "loss": "contrastive"},
    "best-triplet": {**BEST_RUN, "loss": "triplet", "triplet_margin": 0.2},
    "resnext": RESNEXT, "resnext-head256": {**RESNEXT, "head_hidden": 256},
    "resnext-relu": {**RESNEXT, "activation": "relu"},
    "resnext-no-layer4": {**RESNEXT, "drop_layer4": True}, "resnext-dropout": {**RESNEXT, "p": 0.8},
}
# The pretrained track's runs: trainer_pretrained.py's settings, written out.
PRETRAINED = {**BEST_RUN, "model": "efficientnet_lite0", "pretrained": True, "lr": 0.05,
              "freeze_stages": 2, "drop_last_stage": True, "channels_last": True,
              "mixed_precision": False, "torch_compile": False}
EFFNET = {**PRETRAINED, "mlp_depth": 1, "drop_last_stage": False}
LONG_RUN = {"max_minutes": 30.0}
SCRATCH = {**PRETRAINED, **LONG_RUN, "pretrained": False, "freeze_stages": 0}
EPOCHS = {**PRETRAINED, "max_minutes": 0.0, "epochs": ablations.SCRATCH_EPOCHS["scratch-30"]}
NEW_RUNS = {
    "effnet": EFFNET, "effnet-head256": {**EFFNET, "head_hidden": 256},
    "effnet-relu": {**EFFNET, "activation": "relu"},
    "effnet-no-last-stage": {**EFFNET, "drop_last_stage": True}, "effnet-dropout": {**EFFNET, "p": 0.8},
    "pretrained-30": {**PRETRAINED, **LONG_RUN},
    "pretrained-30-seed1": {**PRETRAINED, **LONG_RUN, "seed": 1},
    "scratch-30": SCRATCH, "scratch-30-seed1": {**SCRATCH, "seed": 1},
    "pretrained-epochs": EPOCHS, "pretrained-epochs-seed1": {
        **EPOCHS, "seed": 1, "epochs": ablations.SCRATCH_EPOCHS["scratch-30-seed1"]},
    "best-30": {**BEST_RUN, **LONG_RUN}, "best-30-seed1": {**BEST_RUN, **LONG_RUN, "seed": 1},
}


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
    for name in ablations.RUNS:
        assert ("--model=resnext" in ablations.resolve(name)[1]) == ablations.needs_imagenet(name)
    assert ablations.change({"base": "seed", "variant": "seed-lr1e-3"}) == "`--lr=1e-3`"
    assert ablations.change({"base": "seed", "variant": "seed-long"}) == "3x the budget"
    # an epoch-counted run's budget multiple means nothing; its overrides say what it changes
    assert ablations.change({"base": "scratch-30", "variant": "pretrained-epochs"}) == (
        f"`--max_minutes=0`, `--epochs={ablations.SCRATCH_EPOCHS['scratch-30']}`, without "
        "`--pretrained=False`, without `--freeze_stages=0`")
    assert ablations.change({"base": "best-30", "variant": "pretrained-30"}) == "pretrained recipe"
    # the analogue rows say what they are analogues of, on what
    for rid in ("12e", "13e", "14e", "15e"):
        row = next(r for r in ablations.ROWS if r[0] == rid)
        assert "EfficientNet-Lite0" in row[1] and f"row {rid[:-1]}" in row[1]
        assert all(name.startswith("effnet") for name in row[2:4])


def test_every_ablation_run_trains_with_the_settings_of_the_old_copies(tmp_path):
    args = ablations.parse_args(["--data-root", "data", "--crops", "crops", "--logs",
                                 str(tmp_path)])
    assert set(ablations.RUNS) == set(OLD_RUNS) | set(NEW_RUNS)
    for name, expected in {**OLD_RUNS, **NEW_RUNS}.items():
        run_name = str((tmp_path / f"ablation-{name}").resolve())
        assert_trains_as_before(ablations.train_command(args, name),
                                {**expected, "run_name": run_name, "snapshot_minutes": ""})


def test_a_run_is_a_set_of_overrides_each_changing_what_it_builds_on():
    """No run restates a setting that its recipe, its trainer or its base run already has."""
    for name, (_, overrides, _budget) in ablations.RUNS.items():
        recipe, inherited = ablations.resolve(name)
        spec = experiments.RECIPES[recipe]
        below = [spec["trainer"], *spec["train"], *inherited[:len(inherited) - len(overrides)]]
        before = experiments.trainer_config(below)
        for override in overrides:
            key = override[2:].partition("=")[0]
            assert experiments.trainer_config([*below, override])[key] != before[key], (name, key)


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


def test_ablations_write_every_output_resume_and_reuse_the_runs_of_a_sitting_gone(
        tmp_path, monkeypatch):
    """Rows 12 (ResNeXt-50, not run without its ImageNet weights) and 13e (pretrained
    EfficientNet-Lite0, ReLU head against sigmoid) in seconds-long runs: every output written,
    a second invocation training nothing. Then row 12e in a later sitting whose cache and logs
    are gone: the earlier rows, runs and sitting stay in the table, and the shared `effnet` run
    is reused from its kept DevTest scores instead of trained again. (One test: each run is
    three subprocesses, so every run saved here is seconds of the suite.)"""
    small_lfw(tmp_path / "lfw")
    monkeypatch.setattr(ablations, "imagenet_weights_file", lambda: tmp_path / "absent.pth")
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(ROOT / "RECIPE.md", docs / "RECIPE.md")
    out = tmp_path / "results"
    common = ["--minutes", "0.02", "--out", out, "--data-root", tmp_path / "lfw", "--crops",
              tmp_path / "lfw" / "images", "--logs", tmp_path / "logs",
              "--train-args", "--val_pairs=20 --val_fraction=0.25 --threads=1 --batch_size=16 "
              "--pairs_per_epoch=64 --torch_compile=False --embedding_dim=32 --image_size=64 "
              "--head_hidden=64"]
    first_args = [str(a) for a in ["--rows", "12,13e", "--docs", docs, *common]]
    assert ablations.main(first_args) == 0
    first = json.loads((out / "ablations.json").read_text())
    # Steps are kept by these names, whatever their command lines say.
    assert set(json.loads((out / "cache" / "state.json").read_text())) == {
        f"{run}-{step}" for run in ("effnet", "effnet-relu") for step in ("train", "eval", "eval-train")}
    assert [r["id"] for r in first["rows"]] == ["12", "13e"]
    assert first["rows"][0]["verdict"] == "not run: needs ImageNet weights"
    row = first["rows"][1]
    assert row["verdict"] in ("holds", "does not hold", "inconclusive")
    assert row["low"] <= row["difference"] <= row["high"]
    assert set(first["runs"]) == {"effnet", "effnet-relu"}
    for r in first["runs"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1
        assert r["contaminated"] is False  # DevTest people are never trained on
    assert first["runs"]["effnet-relu"]["overrides"] == [
        "--mlp_depth=1", "--drop_last_stage=False", "--activation=relu"]
    cfg = json.loads((tmp_path / "logs" / "ablation-effnet-relu" / "config.json").read_text())
    assert (cfg["config"]["model"], cfg["config"]["activation"], cfg["config"]["mlp_depth"],
            cfg["config"]["pretrained"], cfg["config"]["drop_last_stage"]) == (
        "efficientnet_lite0", "relu", 1, True, False)
    assert (out / "ablations.png").stat().st_size > 1000
    table = (out / "ablations.md").read_text()
    assert table in (docs / "RECIPE.md").read_text()
    assert "| 12 | ResNeXt-50" in table and "not run" in table
    # A second invocation trains nothing again, and --tables-only rewrites the table.
    state = (out / "cache" / "state.json").read_text()
    assert ablations.main(first_args) == 0
    assert (out / "cache" / "state.json").read_text() == state
    (out / "ablations.md").unlink()
    assert ablations.main(["--tables-only", "--out", str(out), "--docs", ""]) == 0
    assert (out / "ablations.md").read_text() == table

    shutil.rmtree(out / "cache")
    shutil.rmtree(tmp_path / "logs")
    assert ablations.main([str(a) for a in ["--rows", "12e", "--docs", "", *common]]) == 0
    result = json.loads((out / "ablations.json").read_text())
    assert [r["id"] for r in result["rows"]] == ["12", "12e", "13e"]
    assert result["rows"][2] == first["rows"][1]
    assert set(result["runs"]) == {"effnet", "effnet-head256", "effnet-relu"}
    assert result["runs"]["effnet"] == first["runs"]["effnet"]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["ablation-effnet-head256"]
    for run in result["runs"].values():
        assert 0 <= run["accuracy"] <= 1 and run["epochs"] >= 1 and run["trained_minutes"] > 0
    assert [s["rows"] for s in result["sittings"]] == [["12", "13e"], ["12e"]]
    table = (out / "ablations.md").read_text()
    assert table.count("by `python ablations.py") == 2
    assert "| 12e | ResNeXt-50's row 12, on EfficientNet" in table
    for row in result["rows"][1:]:
        assert row["low"] <= row["difference"] <= row["high"]


def test_unknown_rows_and_missing_data_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no row 99"):
        ablations.main(["--rows", "1,99", "--data-root", str(tmp_path)])
    with pytest.raises(SystemExit, match="make it with `make data`"):
        ablations.main(["--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
