"""trainer2.py options that the end-to-end tests in test_training.py leave at their defaults:
ema, num_workers, cache_images, early stopping on each metric, label_smoothing, split=view2,
ResNeXt-50, and the contract between evaluate.py's results.json and its readers (benchmark.py,
app.py). Every run is a seconds-long training on a synthetic LFW (conftest.write_people)."""
import csv
import json
import random
from pathlib import Path

import pytest
import torch

import backbones
import dataset as ds
import evaluate
import losses
import model as m
import training
import trainer2
from conftest import tiny_args, validation_data, write_people, write_view1_protocol

TRAIN = {**{f"Train_Person_{k:02d}": 4 + k % 3 for k in range(16)}, "Single_Image": 1}
TEST = {f"Test_Person_{k:02d}": 3 + k % 2 for k in range(8)}
CHECKPOINTS = ["last.pt"] + [f"best_{k}.pt" for k in training.METRICS]
# metrics.csv columns that depend only on the seed and the data, not on wall-clock time.
SEEDED = ("epoch", "step", "lr", "train_loss", "loss", "accuracy", "precision", "recall", "f1",
          "auc", "threshold")


def rows(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def seeded(run_dir):
    return [{k: float(r[k]) for k in SEEDED} for r in rows(run_dir)]


@pytest.fixture(scope="module")
def lfw(tmp_path_factory):
    """conftest's synthetic_lfw, built once for this module: 16 training people (and one with
    a single image), 8 View 1 test people."""
    root = tmp_path_factory.mktemp("lfw")
    write_people(root / "images", {**TRAIN, **TEST})
    write_view1_protocol(root, TRAIN, TEST)
    return root


@pytest.fixture(scope="module")
def base(lfw):
    """The reference run: trainer2's defaults (arcface, cache_images=True, num_workers=0,
    ema=0, label_smoothing=0) at tiny_args' sizes."""
    run_dir = lfw / "runs" / "base"
    assert training.main(vars(trainer2), tiny_args(lfw, run_dir)) == 0
    return run_dir


# ---------------------------------------------------------------- ema

def test_ema_checkpoints_hold_the_moving_average_and_validation_uses_it(lfw, monkeypatch):
    """With ema=0.5 every best_*.pt holds the exponential moving average of the weights the
    optimiser produced (recomputed here from the weights after every step), not the raw
    weights that last.pt keeps for resuming, and the logged metrics are the average's."""
    decay, trajectory = 0.5, []
    update = torch.optim.swa_utils.AveragedModel.update_parameters

    def recording(self, model):
        trajectory.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return update(self, model)
    monkeypatch.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters", recording)
    run_dir = lfw / "runs" / "ema"
    # One epoch: every best_*.pt is then written at the end of the run, like last.pt.
    assert training.main(vars(trainer2), tiny_args(lfw, run_dir, epochs=1, ema=decay)) == 0
    table = rows(run_dir)
    assert len(table) == 1 and int(table[0]["step"]) == len(trajectory) >= 3

    expected = dict(trajectory[0])
    for weights in trajectory[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w if w.is_floating_point() else w
                    for k, w in weights.items()}
    last = torch.load(run_dir / "last.pt", weights_only=True)
    raw = {k.removeprefix("net."): v for k, v in last["model"].items() if k.startswith("net.")}
    for k, v in trajectory[-1].items():
        assert torch.equal(raw[k], v), k  # last.pt keeps the raw weights
    best = torch.load(run_dir / "best_accuracy.pt", weights_only=True)
    assert set(best["model"]) == set(raw)
    averaged = [k for k, v in raw.items() if v.is_floating_point()]
    for k in averaged:
        assert torch.allclose(best["model"][k], expected[k], rtol=1e-5, atol=1e-6), k
    assert any(not torch.allclose(best["model"][k], raw[k]) for k in averaged)
    for name in CHECKPOINTS[1:]:
        other = torch.load(run_dir / name, weights_only=True)["model"]
        assert all(torch.equal(other[k], best["model"][k]) for k in other), name

    # The logged validation figures are those of the averaged weights, not the raw ones.
    cfg = best["config"]
    split = ds.make_split(cfg["data_dir"], cfg["protocol_dir"], cfg["split"], cfg["seed"],
                          cfg["val_fraction"], cfg["val_pairs"])
    data = validation_data(split)
    net, _ = m.load_checkpoint(run_dir / "best_accuracy.pt")
    ema_row = training.validate(net, cfg, data, torch.device("cpu"))
    net.load_state_dict(raw)
    raw_row = training.validate(net, cfg, data, torch.device("cpu"))
    assert ema_row["loss"] == pytest.approx(float(table[0]["loss"]), rel=1e-5, abs=1e-7)
    assert raw_row["loss"] != pytest.approx(float(table[0]["loss"]), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- data loading

def test_num_workers_trains_reproducibly(lfw, base, monkeypatch):
    """num_workers=1 trains, writes every checkpoint and is reproducible for a seed. It does
    not reproduce num_workers=0: worker processes draw augmentations from their own seeded
    generators, the main process from the global one (DataLoader behaviour), so only the
    data order and the schedule are shared with the in-process run."""
    def in_a_worker(self, i):  # the training images must come through a worker process
        assert torch.utils.data.get_worker_info() is not None, "loaded in the main process"
        return getitem(self, i)
    getitem = ds.ImageDataset.__getitem__
    monkeypatch.setattr(ds.ImageDataset, "__getitem__", in_a_worker)
    runs = [lfw / "runs" / f"workers-{i}" for i in (1, 2)]
    for run_dir in runs:
        assert training.main(vars(trainer2), tiny_args(lfw, run_dir, num_workers=1)) == 0
        for name in CHECKPOINTS:
            assert (run_dir / name).is_file(), name
    first, second = seeded(runs[0]), seeded(runs[1])
    assert first == second
    reference = seeded(base)
    for key in ("epoch", "step", "lr"):
        assert [r[key] for r in first] == [r[key] for r in reference], key
    assert all(0 <= r[k] <= 1 for r in first for k in ("accuracy", "auc", "f1"))


def test_cache_images_off_gives_the_same_run(lfw, base):
    run_dir = lfw / "runs" / "no-cache"
    assert training.main(vars(trainer2), tiny_args(lfw, run_dir, cache_images=False)) == 0
    assert seeded(run_dir) == seeded(base)
    a = torch.load(run_dir / "best_loss.pt", weights_only=True)["model"]
    b = torch.load(base / "best_loss.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- early stopping

def stop_epoch(values, patience, lower_is_better):
    """The stopping rule: the epoch at which `patience` evaluations in a row have not strictly
    improved on the best so far, or None if the run never gets there."""
    best, bad = None, 0
    for epoch, v in enumerate(values, 1):
        if best is None or (v < best if lower_is_better else v > best):
            best, bad = v, 0
        else:
            bad += 1
        if bad >= patience:
            return epoch
    return None


def best_epoch(values, lower_is_better):
    pick = min if lower_is_better else max
    return values.index(pick(values)) + 1  # the first epoch reaching the best value


# Planted validation metrics per epoch, so that each metric stops at a known epoch with
# patience 2: a tie is no improvement (recall), an improvement resets the count (precision,
# f1), and for the loss lower is better (read as higher-is-better it would stop at epoch 4).
PLANTED = {
    "accuracy":  [0.60, 0.70, 0.70, 0.65, 0.90, 0.90, 0.90],
    "precision": [0.50, 0.60, 0.60, 0.70, 0.70, 0.70, 0.90],
    "recall":    [0.90, 0.80, 0.90, 0.95, 0.95, 0.95, 0.95],
    "f1":        [0.50, 0.40, 0.60, 0.60, 0.55, 0.90, 0.90],
    "auc":       [0.70, 0.80, 0.90, 0.90, 0.85, 0.95, 0.95],
    "loss":      [1.00, 1.20, 0.90, 0.95, 0.97, 0.50, 0.40],
}
STOPS = {"accuracy": 4, "precision": 6, "recall": 3, "f1": 5, "auc": 5, "loss": 5}
EPOCHS = len(PLANTED["loss"])


@pytest.mark.parametrize("metric", training.METRICS)
def test_early_stopping_on_each_metric(lfw, tmp_path, monkeypatch, capsys, metric):
    validate, calls = training.validate, []

    def planted(*a, **kw):
        row = validate(*a, **kw)
        row.update({k: v[len(calls)] for k, v in PLANTED.items()})
        calls.append(row)
        return row
    monkeypatch.setattr(training, "validate", planted)
    run_dir = tmp_path / metric
    args = tiny_args(lfw, run_dir, epochs=EPOCHS, early_stopping_metric=metric, patience=2,
                     slice_of_data=10, val_pairs=20)
    assert training.main(vars(trainer2), args) == 0
    table = rows(run_dir)
    values = [float(r[metric]) for r in table]
    assert stop_epoch(values, 2, metric == "loss") == len(table) == STOPS[metric] < EPOCHS
    assert f"finished (early stop) after {len(table)} epochs" in capsys.readouterr().out
    # Every best_<m>.pt is the first epoch with the best value of m among the epochs run.
    for name in training.METRICS:
        ckpt = torch.load(run_dir / f"best_{name}.pt", weights_only=True)
        assert ckpt["epoch"] == best_epoch([float(r[name]) for r in table], name == "loss"), name
    assert torch.load(run_dir / "last.pt", weights_only=True)["state"]["epoch"] == len(table)


def test_early_stopping_on_real_validation_accuracy(lfw, tmp_path):
    """Unplanted: the run ends where the rule, applied to its own metrics.csv, says."""
    run_dir = tmp_path / "real"
    assert training.main(vars(trainer2), tiny_args(lfw, run_dir, epochs=4, patience=1,
                                                   early_stopping_metric="accuracy")) == 0
    values = [float(r["accuracy"]) for r in rows(run_dir)]
    assert len(values) == (stop_epoch(values, 1, False) or 4)


# ---------------------------------------------------------------- arcface label smoothing

def test_label_smoothing_reaches_the_arcface_loss_and_changes_it(lfw, base, monkeypatch):
    forward, seen = losses.ArcFace.forward, []

    def spy(self, *a):
        seen.append(self.label_smoothing)
        return forward(self, *a)
    monkeypatch.setattr(losses.ArcFace, "forward", spy)
    run_dir = lfw / "runs" / "smoothing"
    assert training.main(vars(trainer2), tiny_args(lfw, run_dir, label_smoothing=0.1)) == 0
    assert seen and set(seen) == {0.1}
    smooth, plain = seeded(run_dir), seeded(base)
    # Same seed, data and schedule: only the loss differs, from the first epoch on.
    assert [r["step"] for r in smooth] == [r["step"] for r in plain]
    assert smooth[0]["train_loss"] != pytest.approx(plain[0]["train_loss"], rel=1e-4)


# ---------------------------------------------------------------- View 2

FOLDS = 10


def write_view2_protocol(root, seed=0):
    """people.txt (10 folds of 3 people) and pairs.txt ('10 4': per fold 4 matched and 4
    mismatched pairs of that fold's people), in LFW's layout, with their images."""
    rng = random.Random(seed)
    folds = [{f"Fold{k}_Person_{j}": 3 + (k + j) % 2 for j in range(3)} for k in range(FOLDS)]
    write_people(root / "images", {n: c for f in folds for n, c in f.items()}, seed=seed)
    lines = [str(FOLDS)]
    for fold in folds:
        lines += [str(len(fold))] + [f"{n}\t{c}" for n, c in fold.items()]
    (root / "people.txt").write_text("\n".join(lines) + "\n")
    lines = [f"{FOLDS}\t4"]
    for fold in folds:
        names = sorted(fold)
        for _ in range(4):
            n = rng.choice(names)
            i, j = rng.sample(range(1, fold[n] + 1), 2)
            lines.append(f"{n}\t{i}\t{j}")
        for _ in range(4):
            a, b = rng.sample(names, 2)
            lines.append(f"{a}\t{rng.randint(1, fold[a])}\t{b}\t{rng.randint(1, fold[b])}")
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return folds


@pytest.fixture(scope="module")
def view2_run(tmp_path_factory):
    """A run trained with split=view2 on fold 3 held out. Returns (root, run_dir, folds)."""
    root = tmp_path_factory.mktemp("view2")
    folds = write_view2_protocol(root)
    run_dir = root / "run"
    assert training.main(vars(trainer2), tiny_args(root, run_dir, split="view2", fold=3,
                                                   epochs=2, val_pairs=20)) == 0
    return root, run_dir, folds


def test_view2_training_never_sees_the_test_fold(view2_run):
    root, run_dir, folds = view2_run
    assert ds.parse_people(root / "people.txt") == folds  # the file is in LFW's format
    others = set().union(*(f for k, f in enumerate(folds) if k != 3))
    for name in CHECKPOINTS[1:]:
        seen = set(torch.load(run_dir / name, weights_only=True)["train_people"])
        assert seen.isdisjoint(folds[3]), name
        assert seen == others, name  # and every other fold's people are used
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["split"] == "view2" and config["config"]["fold"] == 3
    assert config["train_people"] + config["val_people"] == len(others)


# ---------------------------------------------------------------- ResNeXt-50

def test_one_step_resnext_training(lfw, tmp_path):
    run_dir = tmp_path / "resnext"
    # max_minutes is checked after each step, so a tiny budget means exactly one step.
    args = tiny_args(lfw, run_dir, model="resnext", pretrained=False, image_size=32,
                     batch_size=4, epochs=1, slice_of_data=8, val_pairs=10, max_minutes=1e-4)
    assert training.main(vars(trainer2), args) == 0
    assert (run_dir / "last.pt").is_file()
    assert [int(r["step"]) for r in rows(run_dir)] == [1]
    net, ckpt = m.load_checkpoint(run_dir / "best_loss.pt")
    assert ckpt["model_config"]["model"] == "resnext"
    assert isinstance(net.backbone, backbones.ResNeXtEmbedder)
    assert net.embed(torch.randn(2, 3, 32, 32)).shape == (2, net.backbone.out_dim)


# ---------------------------------------------------------------- results.json contract

NUMBER = (int, float)
# Every key path of results.json that benchmark.py and app.py read, with its type.
# benchmark.view1 (evaluate.py without --fold):
VIEW1_KEYS = {
    ("kfold", "mean"): NUMBER, ("kfold", "std"): NUMBER, ("kfold", "stderr"): NUMBER,
    ("auc",): NUMBER, ("eer",): NUMBER, ("tar@far=1e-2",): NUMBER, ("tar@far=1e-3",): NUMBER,
    ("contaminated",): bool, ("people_seen_in_training",): int, ("epoch",): int,
    ("images",): int, ("n_pairs",): int, ("time_s", "embed"): NUMBER,
    ("time_s", "total"): NUMBER,
}
# benchmark.view2 (evaluate.py --fold K):
VIEW2_KEYS = {
    ("test_fold", "accuracy"): NUMBER, ("test_fold", "threshold"): NUMBER, ("auc",): NUMBER,
    ("people_seen_in_training",): int,
}
# demo_run.py: eval_figures, eval_label and read_evaluations (show_run -> show_evaluations).
APP_KEYS = {
    ("kfold",): dict, ("kfold", "mean"): NUMBER, ("kfold", "stderr"): NUMBER,
    ("auc",): NUMBER, ("eer",): NUMBER, ("tar@far=1e-3",): NUMBER, ("n_pairs",): int,
    ("pairs",): str, ("checkpoint",): str, ("contaminated",): bool,
    ("people_seen_in_training",): int, ("people_in_pairs",): int,
}
# benchmark.plot reads these columns of scores.csv; app.show_evaluations shows roc.png.
SCORES_COLUMNS = ("same", "score")


def lookup(report, path):
    value = report
    for key in path:
        assert isinstance(value, dict) and key in value, f"results.json has no {'.'.join(path)}"
        value = value[key]
    return value


def check_contract(report, out, keys):
    for path, kind in keys.items():
        value = lookup(report, path)
        assert isinstance(value, kind) and not (kind is NUMBER and isinstance(value, bool)), \
            f"{'.'.join(path)} = {value!r} is not {kind}"
    assert report["time_s"]["embed"] > 0  # benchmark divides images by it
    assert (out / "roc.png").is_file()
    with open(out / "scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table and all(c in table[0] for c in SCORES_COLUMNS)
    assert len(table) == report["n_pairs"]


def test_results_json_has_every_key_benchmark_and_app_read(view2_run):
    """evaluate.py as benchmark.py runs it (the whole pairs.txt for View 1 figures and timing,
    --fold K for View 2), into its default folders, where app.py looks for them."""
    import demo_run
    root, run_dir, _ = view2_run
    ckpt = run_dir / "best_accuracy.pt"
    pairs = root / "pairs.txt"
    assert evaluate.main([str(ckpt), "--pairs", str(pairs)]) == 0
    assert evaluate.main([str(ckpt), "--pairs", str(pairs), "--fold", "3"]) == 0
    whole, fold = run_dir / "eval-pairs", run_dir / "eval-pairs-fold3"
    reports = {out: json.loads((out / "results.json").read_text()) for out in (whole, fold)}
    check_contract(reports[whole], whole, {**VIEW1_KEYS, **APP_KEYS})
    check_contract(reports[fold], fold, {**VIEW2_KEYS, **APP_KEYS})
    assert reports[whole]["n_pairs"] == 8 * FOLDS and reports[fold]["n_pairs"] == 8
    # The whole file holds people of the training folds; fold 3's people were held out.
    assert reports[whole]["contaminated"] is True
    assert reports[fold]["contaminated"] is False
    assert reports[fold]["people_seen_in_training"] == 0
    # The demo finds both, the uncontaminated one first, and shows all four headline figures.
    found = demo_run.read_evaluations(run_dir, ckpt)
    assert [folder for folder, _ in found] == [fold, whole]
    assert [report for _, report in found] == [reports[fold], reports[whole]]
    for report in reports.values():
        assert len(demo_run.eval_figures(report)) == 4


def test_a_compiled_training_step_trains_and_saves_plain_weights(tmp_path):
    """torch_compile=True (trainer2's default): the run trains, and its checkpoints load into
    a plain network (no compiler prefixes in the keys)."""
    root = tmp_path / "lfw"
    train = {f"Train_Person_{k:02d}": 4 + k % 3 for k in range(12)}
    test = {f"Test_Person_{k:02d}": 3 for k in range(4)}
    write_people(root / "images", {**train, **test})
    write_view1_protocol(root, train, test)
    run_dir = tmp_path / "run"
    assert training.main(vars(trainer2), tiny_args(root, run_dir, epochs=1,
                                                   torch_compile=True)) == 0
    net, ckpt = m.load_checkpoint(run_dir / "best_accuracy.pt")
    assert not any("_orig_mod" in k for k in ckpt["model"]) and ckpt["config"]["torch_compile"]
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in last["model"])


def test_a_device_that_is_not_there_is_one_line_before_anything_is_made(tmp_path, monkeypatch):
    import trainer2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^error: .*cuda.*") as e:
        training.load_config(vars(trainer2), ["--device=cuda", f"--run_name={tmp_path / 'r'}"])
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()
