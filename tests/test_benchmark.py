"""benchmark.py on synthetic data with a budget of seconds. (The View 2 fold logic on the real
protocol files is dataset.make_split's, tested in test_dataset.py.)"""
import json
import random
import shutil
import tarfile
from pathlib import Path

import pytest

import benchmark
import download_data
from conftest import write_people

ROOT = Path(__file__).resolve().parent.parent


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
    assert download_data.main(["--archive", str(lfw / "lfw-synthetic.tgz"), "--protocol-dir",
                               str(lfw), "--root", str(data)]) == 0
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("README.md", "RECIPE.md"):
        shutil.copy(ROOT / name, docs / name)
    out = tmp_path / "results"
    args = ["--lfw", lfw, "--protocol", "view1", "--minutes", "0.05", "--out", out,
            "--data-root", data, "--crops", tmp_path / "crops", "--logs", tmp_path / "logs",
            "--docs", docs, "--train-args", "--val_pairs=20 --val_fraction=0.2 --threads=1 --batch_size=16 --pairs_per_epoch=64"]
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
    assert result["speed"]["crop_images_per_s"] > 0 and result["speed"]["peak_rss_mb"] > 0
    assert {"cpu", "threads"} <= set(result["machine"])
    table = (out / "benchmark.md").read_text()
    for name in ("README.md", "RECIPE.md"):
        doc = (docs / name).read_text()
        assert table in doc and "No benchmark has been recorded yet" not in doc
    # A second run reuses every finished step: nothing is trained or cropped again.
    state = json.loads((out / "cache" / "state.json").read_text())
    assert benchmark.main([str(a) for a in args]) == 0
    assert json.loads((out / "cache" / "state.json").read_text()) == state


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
