"""benchmark.py on synthetic data with a budget of seconds. (The View 2 fold logic on the real
protocol files is dataset.make_split's, tested in test_dataset.py.)"""
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import benchmark
import download_data
import experiments
import trainer2
import training
from conftest import tiny_args, write_people

ROOT = Path(__file__).resolve().parent.parent

# What the benchmark's runs trained with while experiments.py's `seed` recipe was a copy of
# trainer.py's values laid over trainer2.py, written out by hand (with --crops crops
# --data-root data). A recipe rewritten as overrides must keep every one of these values, and
# every other setting at trainer2.py's default, the base that every old run had.
BOTH = {"data_dir": "crops", "protocol_dir": "data", "split": "view1", "fold": 0,
        "epochs": 100000, "patience": 30, "erase_p": 0.0, "pretrained": True, "momentum": 0.9,
        "cos": True, "warmup_epochs": 1, "mixed_precision": True, "torch_compile": True,
        "batch_augment": True, "seed": 0, "val_fraction": 0.1, "val_pairs": 1000, "p": 0.0,
        "width": 0, "head_hidden": 1024, "activation": "sigmoid", "drop_layer4": False,
        "triplet_margin": 0.5, "pairs_per_epoch": 0}
SEED = {**BOTH, "model": "koch", "init": "koch", "image_size": 105, "augment_p": 0.5,
        "loss": "bce", "distance": "l1", "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0,
        "batch_size": 64}
BEST = {**BOTH, "model": "compact", "init": "kaiming", "image_size": 112, "augment_p": 0.8,
        "loss": "arcface", "distance": "cosine", "optimizer": "sgd", "lr": 0.1,
        "weight_decay": 5e-4, "batch_size": 128, "embedding_dim": 256, "arc_margin": 0.5}


def assert_trains_as_before(cmd, expected):
    """The trainer command CMD trains with EXPECTED's values and trainer2.py's other defaults."""
    cfg = experiments.trainer_config(cmd)
    before = {**training.defaults_of(vars(trainer2)), **expected}
    assert {k: (cfg.get(k), before.get(k)) for k in {*cfg, *before}
            if cfg.get(k) != before.get(k)} == {}, cmd


class Ran(Exception):
    """A step that benchmark.py would have run, with its command."""


def first_training_command(tmp_path, monkeypatch, protocol, recipe):
    """The command of the first training step that benchmark.py's PROTOCOL runs for RECIPE
    (nothing runs: run_step stops at the first step)."""
    def stop(name, cmd, *rest):
        raise Ran(cmd)
    monkeypatch.setattr(benchmark, "run_step", stop)
    args = benchmark.parse_args(["--minutes", "30", "--crops", "crops", "--data-root", "data",
                                 "--logs", str(tmp_path), "--out", str(tmp_path / "out")])
    run = benchmark.view1 if protocol == "view1" else benchmark.view2
    with pytest.raises(Ran) as e:
        run(args, recipe, {}, tmp_path / "state.json", tmp_path, None)
    return e.value.args[0]


@pytest.mark.parametrize("protocol, recipe, expected", [
    ("view1", "seed", {**SEED, "max_minutes": 30.0, "snapshot_minutes": "5,10,20"}),
    ("view1", "best", {**BEST, "max_minutes": 30.0, "snapshot_minutes": "5,10,20"}),
    ("view2", "seed", {**SEED, "split": "view2", "max_minutes": 3.0, "snapshot_minutes": ""}),
    ("view2", "best", {**BEST, "split": "view2", "max_minutes": 10.0, "snapshot_minutes": ""}),
])
def test_every_benchmark_run_trains_with_the_settings_of_the_old_copies(
        tmp_path, monkeypatch, protocol, recipe, expected):
    cmd = first_training_command(tmp_path, monkeypatch, protocol, recipe)
    folder = f"bench-{protocol}-{recipe}" + ("-fold0" if protocol == "view2" else "")
    assert_trains_as_before(cmd, {**expected, "run_name": str((tmp_path / folder).resolve())})


def test_a_recipe_is_its_trainer_file_run_on_the_crops(tmp_path, monkeypatch):
    """The `seed` recipe is trainer.py's defaults, `best` trainer2.py's and `pretrained`
    trainer_pretrained.py's: their commands set only the data, the budget and the run's
    folder, never a copy of a hyperparameter."""
    assert {r["trainer"] for r in experiments.RECIPES.values()} == {
        "trainer.py", "trainer2.py", "trainer_pretrained.py"}
    given = {"data_dir", "protocol_dir", "max_minutes", "epochs", "patience", "run_name",
             "snapshot_minutes", "split"}
    for recipe, spec in experiments.RECIPES.items():
        cmd = first_training_command(tmp_path, monkeypatch, "view1", recipe)
        assert cmd[0] == spec["trainer"] and (ROOT / cmd[0]).is_file()
        assert {a[2:].partition("=")[0] for a in cmd[1:]} <= given, recipe


def synthetic_lfw(folder, seed=0):
    """An LFW-shaped folder: lfw-synthetic.tgz (lfw-deepfunneled/<Name>/...) and all seven
    protocol files, View 1 and View 2, for 40 people."""
    rng = random.Random(seed)
    counts = {f"Person_{k:02d}": 2 + k % 3 for k in range(40)}
    names = sorted(counts)
    write_people(folder / "lfw-deepfunneled", counts, size=48, seed=seed)
    with tarfile.open(folder / "lfw-synthetic.tgz", "w:gz") as tar:
        tar.add(folder / "lfw-deepfunneled", arcname="lfw-deepfunneled")
    shutil.rmtree(folder / "lfw-deepfunneled")
    (folder / "lfw-names.txt").write_text("".join(f"{n}\t{counts[n]}\n" for n in names))
    folds = [names[k::10] for k in range(10)]  # 4 people per fold
    (folder / "people.txt").write_text("10\n" + "".join(
        f"{len(f)}\n" + "".join(f"{n}\t{counts[n]}\n" for n in f) for f in folds))
    train, test = names[:30], names[30:]
    (folder / "peopleDevTrain.txt").write_text(f"{len(train)}\n" + "".join(f"{n}\t{counts[n]}\n" for n in train))
    (folder / "peopleDevTest.txt").write_text(f"{len(test)}\n" + "".join(f"{n}\t{counts[n]}\n" for n in test))

    def pairs(people, n):
        same = [f"{p}\t1\t2" for p in rng.choices(people, k=n)]
        diff = [f"{a}\t1\t{b}\t2" for a, b in (rng.sample(people, 2) for _ in range(n))]
        return same + diff
    (folder / "pairsDevTrain.txt").write_text("\n".join(["20"] + pairs(train, 20)) + "\n")
    (folder / "pairsDevTest.txt").write_text("\n".join(["10"] + pairs(test, 10)) + "\n")
    (folder / "pairs.txt").write_text("\n".join(["10\t3"] + [l for f in folds for l in pairs(f, 3)]) + "\n")
    return folder


def test_benchmark_smoke_writes_every_output(tmp_path, monkeypatch):
    lfw = synthetic_lfw(tmp_path / "lfw")
    data = tmp_path / "dataset"
    # The real checksums would reject synthetic protocol files: extract once with the known
    # sums switched off, so that the benchmark's own download step finds complete data.
    monkeypatch.setattr(download_data, "SHA256", {})
    monkeypatch.setattr(download_data, "MD5", {})
    # One snapshot a run instead of three: each is an evaluation step of its own (about 6 s).
    monkeypatch.setattr(benchmark, "SNAPSHOT_SHARES", (1 / 3,))
    assert download_data.main(["--archive", str(lfw / "lfw-synthetic.tgz"), "--protocol-dir",
                               str(lfw), "--root", str(data)]) == 0
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("README.md", "RECIPE.md"):
        shutil.copy(ROOT / name, docs / name)
    out = tmp_path / "results"
    args = ["--lfw", lfw, "--protocol", "view1", "--minutes", "0.05", "--out", out,
            "--data-root", data, "--crops", tmp_path / "crops", "--logs", tmp_path / "logs",
            "--docs", docs, "--profile-steps", "3", "--profile-rounds", "1",
            "--recipes", "seed,best",
            "--train-args", "--val_pairs=20 --val_fraction=0.2 --threads=1 --batch_size=16 --pairs_per_epoch=64 "
                          "--torch_compile=False"]
    assert benchmark.main([str(a) for a in args]) == 0
    for name in ("benchmark.json", "benchmark.md", "accuracy_vs_minutes.png", "roc_view1.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "benchmark.json").read_text())
    for key in ("view1", "command", "minutes", "git_commit", "torch", "machine", "speed",
                "recipe_overrides", "curve_minutes"):
        assert key in result, key
    assert set(result["view1"]) == {"seed", "best"}
    for r in result["view1"].values():
        for key in ("accuracy", "std", "stderr", "auc", "tar@far=1e-2", "curve",
                    "train_images_per_s", "embed_images_per_s", "view2_eval_seconds"):
            assert key in r, key
        assert r["contaminated"] is False and 0 <= r["accuracy"] <= 1
        pairs = r["all_pairs"]  # every pair of the DevTest people's images
        n = pairs["n_images"]
        assert pairs["n_same"] + pairs["n_different"] == n * (n - 1) // 2 > 0
    assert result["speed"]["crop_images_per_s"] > 0 and result["speed"]["peak_rss_mb"] > 0
    assert {"cpu", "threads"} <= set(result["machine"])
    table = (out / "benchmark.md").read_text()
    for name in ("README.md", "RECIPE.md"):
        doc = (docs / name).read_text()
        assert table in doc and "No benchmark has been recorded yet" not in doc
    assert "**Low false-accept rates** (View 1 DevTest, every pair of the" in table
    # each recipe's training speed with its FLOP/s against the machine's peak, from the profile
    profile = result["profile"]
    assert set(profile["recipes"]) == {"seed", "best"}
    assert set(profile["recipes"]["best"]["paths"]) == set(benchmark.PROFILES["best"])
    assert profile["recipes"]["best"]["rounds"] == 1  # --profile-rounds reached the profile step
    assert table.count("of this machine's") == 2 and "GFLOP/s (" in table
    # A second run reuses every finished step: nothing is trained or cropped again. Steps are
    # kept by these names (an older state.json's), whatever their command lines say.
    state = json.loads((out / "cache" / "state.json").read_text())
    assert {"download", "crop", "crop-speed", "profile", "view1-seed-train",
            "view1-seed-eval-0.05min", "view2-timing-seed", "view1-seed-identify",
            "view1-best-train", "view1-best-eval-0.05min", "view2-timing-best",
            "view1-best-identify", "view1-seed-all-pairs", "view1-best-all-pairs"} <= set(state)
    assert benchmark.main([str(a) for a in args]) == 0
    assert json.loads((out / "cache" / "state.json").read_text()) == state


def test_an_ensemble_recipe_trains_its_members_on_shares_of_the_budget(synthetic_lfw, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(benchmark.RECIPES, "trio", {**benchmark.RECIPES["best"], "members": 3})
    train_args = " ".join(a for a in tiny_args(synthetic_lfw, tmp_path / "unused")
                          if not a.startswith(("--data_dir", "--protocol_dir", "--run_name",
                                               "--epochs", "--max_minutes")))
    logs, cache = tmp_path / "logs", tmp_path / "cache"
    cache.mkdir()
    args = benchmark.parse_args(["--crops", str(synthetic_lfw / "images"), "--data-root",
                                 str(synthetic_lfw), "--logs", str(logs), "--out",
                                 str(tmp_path / "out"), "--train-args", train_args])
    state, state_path = {}, cache / "state.json"
    trained, curve = benchmark.train(args, "trio", None, 0.06,
                                     ["--split=view1"], "view1-trio-train", state, state_path,
                                     cache)
    assert trained == logs / "bench-view1-trio-m0"
    assert set(state) == {"view1-trio-train-m0", "view1-trio-train-m1", "view1-trio-train-m2",
                          "view1-trio-train-2of3", "view1-trio-train"}
    # The curve: the first member alone after a third of the budget, then the first two
    # members' ensemble, then all three.
    assert sorted(curve) == pytest.approx([0.02, 0.04, 0.06])
    assert [curve[m] for m in sorted(curve)] == [
        logs / "bench-view1-trio-m0" / "best_accuracy.pt",
        logs / "bench-view1-trio-2of3" / "best_accuracy.pt",
        logs / "bench-view1-trio" / "best_accuracy.pt"]
    configs = [json.loads((logs / f"bench-view1-trio-m{i}" / "config.json").read_text())
               ["config"] for i in range(3)]
    assert [c["member_seed"] for c in configs] == [0, 1, 2]
    assert [c["max_minutes"] for c in configs] == pytest.approx([0.02] * 3)
    two = logs / "bench-view1-trio-2of3" / "best_accuracy.pt"
    for ckpt, n in ((curve[max(curve)], 3), (two, 2)):
        saved = torch.load(ckpt, weights_only=False)
        assert saved["model_config"]["model"] == "ensemble" and len(saved["members"]) == n
    # A second call finds every step done and runs none of them again.
    before = {m: ckpt.stat().st_mtime_ns for m, ckpt in curve.items()}
    assert benchmark.train(args, "trio", None, 0.06, ["--split=view1"],
                           "view1-trio-train", state, state_path, cache)[1] == curve
    assert {m: ckpt.stat().st_mtime_ns for m, ckpt in curve.items()} == before
    # A recipe with a teacher learns from that recipe's model of the same protocol and fold.
    monkeypatch.setitem(benchmark.RECIPES, "pupil", {**benchmark.RECIPES["best"], "teacher": "trio",
                                                     "train": ["--loss=distill"]})
    with pytest.raises(SystemExit, match="list trio before pupil in --recipes"):
        benchmark.train(args, "pupil", 3, 0.02, ["--split=view2", "--fold=3"], "view2-pupil-fold3",
                        state, state_path, cache)
    pupil, _ = benchmark.train(args, "pupil", None, 0.02, ["--split=view1"], "view1-pupil-train",
                               state, state_path, cache)
    cfg = json.loads((pupil / "config.json").read_text())["config"]
    assert cfg["loss"] == "distill" and cfg["teacher"] == str(curve[max(curve)].resolve())


def test_unknown_recipe_and_missing_archive_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="unknown recipe fancy"):
        benchmark.main(["--recipes", "seed,fancy", "--lfw", str(tmp_path)])
    with pytest.raises(SystemExit, match="no LFW archive"):
        benchmark.main(["--lfw", str(tmp_path / "nowhere")])


def test_a_run_another_benchmark_made_is_never_deleted(tmp_path):
    run = tmp_path / "logs" / "bench-view1-best"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "best_accuracy.pt").write_text("weights")
    with pytest.raises(SystemExit, match="did not start; pass another --logs"):
        benchmark.claim_run_dir(run, tmp_path / "other-results")
    assert (run / "best_accuracy.pt").read_text() == "weights"
    # A half-finished run of this benchmark's own starts over.
    (run / "benchmark_out.txt").write_text(str((tmp_path / "results").resolve()))
    benchmark.claim_run_dir(run, tmp_path / "results")
    assert sorted(p.name for p in run.iterdir()) == ["benchmark_out.txt"]
