import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dataset as ds
import model as m
import recipes
import training
import trainer2
from conftest import tiny_args, validation_data, write_people, write_view1_protocol
from runtime import git_commit

ROOT = Path(__file__).resolve().parent.parent
FILES = ["config.json", "metrics.csv", "curves.png", "last.pt"] + \
    [f"best_{k}.pt" for k in ("accuracy", "precision", "recall", "f1", "auc", "loss")]


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- command-line overrides

def test_overrides_are_type_checked():
    defaults = {"epochs": 3, "lr": 0.1, "cos": True, "model": "koch", "resume": ""}
    got = training.apply_overrides(defaults, ["--epochs=7", "--lr=1e-3", "--cos=false",
                                              "--model=resnext"])
    assert got == {"epochs": 7, "lr": 1e-3, "cos": False, "model": "resnext", "resume": ""}
    assert training.apply_overrides(defaults, ["--lr=2"])["lr"] == 2.0
    with pytest.raises(SystemExit, match="--epochs expects a int, got '2.5'"):
        training.apply_overrides(defaults, ["--epochs=2.5"])
    with pytest.raises(SystemExit, match="--cos expects a bool"):
        training.apply_overrides(defaults, ["--cos=maybe"])
    with pytest.raises(SystemExit, match="unknown hyperparameter 'epoch'; did you mean epochs\\? "
                                         "valid names: cos, epochs, lr, model, resume"):
        training.apply_overrides(defaults, ["--epoch=3"])
    margins = {**defaults, "arc_margin": 0.5, "triplet_margin": 0.5}
    with pytest.raises(SystemExit, match="'margin'; did you mean arc_margin or triplet_margin\\?"):
        training.apply_overrides(margins, ["--margin=0.2"])  # the setting before it was split
    with pytest.raises(SystemExit, match="expected --name=value"):
        training.apply_overrides(defaults, ["--epochs", "3"])


def test_trainer_files_expose_every_hyperparameter():
    names = set(recipes.defaults_of(vars(trainer2)))
    old = {"epochs", "batch_size", "num_workers", "lr", "lr_scheduler_on", "gamma", "step_size",
           "weight_decay", "mixed_precision", "patience", "calc_metrics_interval",
           "slice_of_data", "early_stopping_metric", "init", "cos", "p", "model", "optimizer"}
    new = {"loss", "distance", "image_size", "seed", "device", "split", "data_dir", "run_name",
           "max_minutes", "resume"}
    assert old | new <= names
    import trainer
    assert set(recipes.defaults_of(vars(trainer))) == names


def test_bad_choice_is_rejected():
    with pytest.raises(SystemExit, match="loss='hinge' is not one of"):
        training.check_config({**recipes.defaults_of(vars(trainer2)), "loss": "hinge"})


# ---------------------------------------------------------------- learning-rate schedule

def test_lr_schedules():
    cfg = {"warmup_epochs": 0, "lr_scheduler_on": True, "cos": True, "gamma": 0.1,
           "step_size": 2, "lr_cycles": 1}
    assert training.lr_factor(cfg, 0.0, 0, 10) == 1.0
    assert training.lr_factor(cfg, 0.5, 50, 10) == pytest.approx(0.5)
    assert training.lr_factor(cfg, 1.0, 99, 10) == pytest.approx(0.0)
    step = {**cfg, "cos": False}
    assert [training.lr_factor(step, 0, s, 10) for s in (0, 19, 20, 39, 40)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = {**cfg, "warmup_epochs": 1}
    assert training.lr_factor(warm, 0.0, 0, 10) == pytest.approx(0.1)
    assert training.lr_factor(warm, 0.0, 9, 10) == pytest.approx(1.0)
    assert training.lr_factor({**cfg, "lr_scheduler_on": False}, 0.9, 90, 10) == 1.0
    # three warm restarts: each third of the run is a whole cosine, ending at zero
    cycles = {**cfg, "lr_cycles": 3}
    assert [training.lr_factor(cycles, p, 0, 10) for p in (0.0, 1 / 6, 0.3333, 1 / 3 + 1e-9,
                                                           0.5, 0.9999, 1.0, 1.2)] == \
        pytest.approx([1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0], abs=1e-3)


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run shared by this module's tests, on a synthetic LFW laid out as conftest's
    synthetic_lfw. Tests must not change it: copy it first (see copy_run)."""
    root = tmp_path_factory.mktemp("lfw")
    train = {**{f"Train_Person_{k:02d}": 4 + k % 3 for k in range(16)}, "Single_Image": 1}
    test = {f"Test_Person_{k:02d}": 3 + k % 2 for k in range(8)}
    write_people(root / "images", {**train, **test})
    write_view1_protocol(root, train, test)
    run_dir = root / "run"
    assert training.main(vars(trainer2), tiny_args(root, run_dir)) == 0
    return root, run_dir


def copy_run(run_dir, to):
    shutil.copytree(run_dir, to)
    return to


def test_trainer2_writes_every_file_and_applies_the_schedule(trained):
    root, run_dir = trained
    for name in FILES:
        assert (run_dir / name).is_file(), name
    assert list(run_dir.glob("events.out.tfevents.*"))
    table = rows(run_dir)
    assert [int(r["epoch"]) for r in table] == [1, 2, 3]
    lrs = [float(r["lr"]) for r in table]
    assert lrs[0] > lrs[1] > lrs[2] > 0  # cosine, really applied
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["epochs"] == 3
    # The commit of this checkout, or "unknown" outside git (an exported copy).
    assert config["git_commit"] == git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", config["git_commit"])
    if (ROOT / ".git").exists():
        assert config["git_commit"] != "unknown"
    for name in FILES[4:]:
        ckpt = torch.load(run_dir / name, weights_only=True)
        assert ckpt["model_config"]["model"] == "compact" and "threshold" in ckpt
        assert set(ckpt["train_people"]).isdisjoint({f"Test_Person_{k:02d}" for k in range(8)})


def test_best_checkpoints_hold_the_weights_of_their_own_best_epoch(trained):
    root, run_dir = trained
    table = rows(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    split = ds.make_split(cfg["data_dir"], cfg["protocol_dir"], cfg["split"], cfg["seed"],
                          cfg["val_fraction"], cfg["val_pairs"])
    data = validation_data(split)
    for name, pick in (("accuracy", max), ("auc", max), ("loss", min)):
        values = [float(r[name]) for r in table]
        best_epoch = values.index(pick(values)) + 1  # the first epoch reaching the best value
        net, ckpt = m.load_checkpoint(run_dir / f"best_{name}.pt")
        assert ckpt["epoch"] == best_epoch, name
        again = training.validate(net, cfg, data, torch.device("cpu"))
        assert again[name] == pytest.approx(values[best_epoch - 1], abs=1e-5), name
        assert ckpt["threshold"] == pytest.approx(float(table[best_epoch - 1]["threshold"]))


def test_resume_after_an_interrupt_reproduces_the_uninterrupted_run(trained, monkeypatch,
                                                                    tmp_path):
    root, full_dir = trained
    run_dir = tmp_path / "interrupted"
    forward, calls = training.LossModel.forward, {"n": 0}
    per_epoch = json.loads((full_dir / "config.json").read_text())["train_images"] // 16

    def flaky(self, *a):
        calls["n"] += 1
        if calls["n"] == 2 * per_epoch + 1:  # first step of epoch 3
            raise KeyboardInterrupt
        return forward(self, *a)
    monkeypatch.setattr(training.LossModel, "forward", flaky)
    assert training.main(vars(trainer2), tiny_args(root, run_dir)) == 130
    assert len(rows(run_dir)) == 2
    monkeypatch.setattr(training.LossModel, "forward", forward)
    assert training.main(vars(trainer2), [f"--resume={run_dir}"]) == 0
    keys = ("epoch", "step", "lr", "train_loss", "loss", "accuracy", "auc", "threshold")
    full, resumed = rows(full_dir), rows(run_dir)
    assert len(resumed) == 3
    for a, b in zip(full, resumed):
        for k in keys:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-6), k


def test_existing_run_is_not_overwritten(trained):
    root, run_dir = trained
    before = (run_dir / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run; continue it with --resume"):
        training.main(vars(trainer2), tiny_args(root, run_dir))
    assert (run_dir / "last.pt").read_bytes() == before


def test_time_budget_ends_with_a_final_evaluation(synthetic_lfw, tmp_path, capsys):
    run_dir = tmp_path / "budget"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, run_dir, epochs=1000,
                                                   max_minutes=0.004,
                                                   snapshot_minutes="0.0001")) == 0
    assert "time budget spent" in capsys.readouterr().out
    assert 1 <= len(rows(run_dir)) < 1000 and (run_dir / "best_accuracy.pt").exists()
    snap = torch.load(run_dir / "snapshot_0.0001min.pt", weights_only=True)
    assert snap["step"] >= 1 and "threshold" in snap


@pytest.mark.parametrize("loss", ["bce", "contrastive", "triplet"])
def test_other_losses_train(synthetic_lfw, tmp_path, loss):
    run_dir = tmp_path / loss
    args = tiny_args(synthetic_lfw, run_dir, epochs=1, loss=loss, pairs_per_epoch=64,
                     distance="l1" if loss != "triplet" else "cosine",
                     contrastive_margin=0.5, triplet_margin=0.5)
    assert training.main(vars(trainer2), args) == 0
    assert len(rows(run_dir)) == 1


def test_koch_bce_from_trainer_defaults(synthetic_lfw, tmp_path):
    import trainer
    run_dir = tmp_path / "koch"
    args = tiny_args(synthetic_lfw, run_dir, epochs=1, image_size=84, pairs_per_epoch=32,
                     batch_size=8, lr=1e-4)
    assert training.main(vars(trainer), [a for a in args if "embedding_dim" not in a]) == 0
    ckpt = torch.load(run_dir / "best_loss.pt", weights_only=True)
    assert ckpt["model_config"]["model"] == "koch" and ckpt["model_config"]["loss"] == "bce"


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    code = training.main(vars(trainer2), [f"--data_dir={tmp_path / 'nothing'}",
                                          f"--run_name={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 1 and "nothing: no such folder" in err and len(err.strip().splitlines()) == 1


def test_ddp_with_two_gloo_processes(synthetic_lfw, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29533", str(ROOT / "trainer2.py")] + \
        tiny_args(synthetic_lfw, run_dir, epochs=2, device="cpu")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2
    assert [int(r["epoch"]) for r in rows(run_dir)] == [1, 2]  # rank 0 alone logs
    for name in FILES:
        assert (run_dir / name).is_file(), name


def test_resume_fills_new_settings_and_keeps_explicit_overrides(trained, tmp_path):
    root, shared = trained
    run_dir = copy_run(shared, tmp_path / "run")  # resuming changes the run
    config = json.loads((run_dir / "config.json").read_text())
    del config["config"]["snapshot_minutes"]  # a run saved before this setting existed
    (run_dir / "config.json").write_text(json.dumps(config))
    # --lr=0.1 equals trainer2's default but differs from the run's 0.05: it must still win.
    assert training.main(vars(trainer2), [f"--resume={run_dir}", "--epochs=4", "--lr=0.1"]) == 0
    resumed = json.loads((run_dir / "config.json").read_text())["config"]
    assert resumed["epochs"] == 4 and resumed["lr"] == 0.1 and resumed["snapshot_minutes"] == ""
    assert resumed["image_size"] == 32  # the saved run's own settings stay
    assert [int(r["epoch"]) for r in rows(run_dir)] == [1, 2, 3, 4]


def test_resume_from_a_folder_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no last.pt and config.json to resume from"):
        training.main(vars(trainer2), [f"--resume={tmp_path}"])


def test_bad_model_settings_are_one_line(synthetic_lfw, tmp_path, capsys):
    code = training.main(vars(trainer2), tiny_args(synthetic_lfw, tmp_path / "k", model="koch",
                                                   image_size=40))
    err = capsys.readouterr().err
    assert code == 1 and "image_size=40 is too small for KochNet" in err
    with pytest.raises(SystemExit, match="init='fancy' is not one of"):
        training.main(vars(trainer2), tiny_args(synthetic_lfw, tmp_path / "i", init="fancy"))


def test_run_name_with_a_folder_is_a_path(synthetic_lfw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, "runs/mine", epochs=1)) == 0
    assert (tmp_path / "runs" / "mine" / "last.pt").is_file()
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, "plain", epochs=1)) == 0
    assert (tmp_path / "logs" / "plain" / "last.pt").is_file()


# ---------------------------------------------------------------- datasets beyond LFW's files

def test_view1_training_needs_no_test_protocol_file(synthetic_lfw, tmp_path):
    """Training never reads the test pairs, so a View 1 run with peopleDevTrain.txt alone
    trains (it used to stop at the missing pairsDevTest.txt)."""
    (synthetic_lfw / "pairsDevTest.txt").unlink()
    run_dir = tmp_path / "run"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, run_dir, epochs=1)) == 0
    assert (run_dir / "best_accuracy.pt").is_file() and not (run_dir / training.TEST_PAIRS).exists()


def test_random_split_writes_its_test_pairs(tmp_path):
    """A plain <person>/<image> folder (no protocol file) trains with --split=random, and its
    held-out pairs are kept in the run folder for evaluate.py: pairs of people the run never
    trained or validated on, read back by pairs.read_csv against the data folder."""
    import pairs
    counts = {f"person_{k:02d}": 3 + k % 3 for k in range(24)}
    images = write_people(tmp_path / "photos", counts)
    for path in images.rglob("*.jpg"):  # any file names, not LFW's <name>_NNNN.jpg
        path.rename(path.with_name(f"img{path.stem[-2:]}.jpg"))
    run_dir = tmp_path / "run"
    args = tiny_args(tmp_path, run_dir, epochs=1, split="random", data_dir=images)
    assert training.main(vars(trainer2), args) == 0
    got, _ = pairs.read_pairs(run_dir / training.TEST_PAIRS, image_dir=images)
    assert got and all(p.path_a.is_file() and p.path_b.is_file() for p in got)
    assert {p.same for p in got} == {0, 1}
    tested = {p.path_a.parent.name for p in got} | {p.path_b.parent.name for p in got}
    seen = set(torch.load(run_dir / "best_accuracy.pt", weights_only=True)["train_people"])
    assert tested and not tested & seen


def test_a_diverged_run_says_so(synthetic_lfw, tmp_path):
    """A learning rate that blows the loss up to NaN is one line naming the fix, not
    sklearn's "Input contains NaN" from the validation metrics."""
    with pytest.raises(SystemExit, match=r"training diverged: the loss became nan in epoch 1; "
                                         r"lower --lr \(now 1e\+30\)"):
        training.main(vars(trainer2), tiny_args(synthetic_lfw, tmp_path / "run", epochs=1,
                                                lr=1e30, loss="contrastive", distance="l1"))
