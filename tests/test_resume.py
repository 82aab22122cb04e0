"""A training run killed or interrupted at any moment resumes to exactly the records of an
uninterrupted run; damaged inputs and settings fail in one line before anything is written."""
import csv
import os
import pickle

import pytest
import torch

import training
import trainer2
from conftest import tiny_args


class Killed(BaseException):
    """A kill -9 in-process: nothing catches it, so no handler tidies up after it."""


def error_lines(err):
    """The error lines of stderr, without tqdm's progress bars."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error")]


def rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def scalar_steps(run_dir, tag="val/accuracy"):
    """The steps TensorBoard shows for a tag, over every events file of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 3-epoch run on a synthetic LFW."""
    from conftest import small_lfw
    root = tmp_path_factory.mktemp("lfw")
    small_lfw(root, n_train=16)
    assert training.main(vars(trainer2), tiny_args(root, root / "full")) == 0
    return root, root / "full"


def same_records(full, resumed):
    keys = ("epoch", "step", "lr", "train_loss", "loss", "accuracy", "auc", "threshold")
    a, b = rows(full), rows(resumed)
    assert [r["epoch"] for r in b] == ["1", "2", "3"]
    for x, y in zip(a, b):
        for k in keys:
            assert float(x[k]) == pytest.approx(float(y[k]), rel=1e-5, abs=1e-6), k
    # Sorted: EventAccumulator reads a run's events files in name order, and two files
    # written by one process within one second can sort either way; a step shown twice or
    # missing still fails.
    assert sorted(scalar_steps(resumed)) == sorted(scalar_steps(full))


def test_a_kill_as_metrics_csv_gains_a_row_resumes_to_the_same_records(reference, monkeypatch):
    root, full = reference
    run_dir = root / "killed"
    write_rows = training.write_rows

    def dying(path, new_rows):
        write_rows(path, new_rows)
        if len(new_rows) == 2:  # epoch 2's row is on disk: kill before anything else
            raise Killed
    monkeypatch.setattr(training, "write_rows", dying)
    with pytest.raises(Killed):
        training.main(vars(trainer2), tiny_args(root, run_dir))
    monkeypatch.setattr(training, "write_rows", write_rows)
    assert training.main(vars(trainer2), [f"--resume={run_dir}"]) == 0
    same_records(full, run_dir)
    best = torch.load(run_dir / "best_loss.pt", weights_only=True)
    assert best["epoch"] == torch.load(full / "best_loss.pt", weights_only=True)["epoch"]


def test_a_kill_while_saving_best_checkpoints_is_repaired_on_resume(reference, monkeypatch):
    root, full = reference
    run_dir = root / "killed-best"
    # Epoch 1 always saves every best_*.pt (the first evaluation improves every metric), so
    # the kill happens whatever the synthetic data's trajectory; last.pt is written first.
    save, epoch = torch.save, 1

    def dying(obj, path, *a, **k):
        if "best_" in str(path) and isinstance(obj, dict) and obj.get("epoch") == epoch:
            raise Killed
        return save(obj, path, *a, **k)
    monkeypatch.setattr(training.torch, "save", dying)
    with pytest.raises(Killed):
        training.main(vars(trainer2), tiny_args(root, run_dir))
    monkeypatch.setattr(training.torch, "save", save)
    assert training.main(vars(trainer2), [f"--resume={run_dir}"]) == 0
    same_records(full, run_dir)


def test_ctrl_c_during_evaluation_tells_the_truth_and_leaves_no_temporary_file(
        reference, monkeypatch, capsys):
    root, _ = reference
    run_dir = root / "ctrl-c"
    validate, calls = training.validate, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2's evaluation
            raise KeyboardInterrupt
        return validate(*a, **k)
    monkeypatch.setattr(training, "validate", interrupted)
    assert training.main(vars(trainer2), tiny_args(root, run_dir)) == 130
    err = capsys.readouterr().err
    assert "interrupted in epoch 2" in err and "last.pt holds the end of epoch 1" in err
    assert torch.load(run_dir / "last.pt", weights_only=True)["state"]["epoch"] == 1


def test_ctrl_c_while_saving_a_checkpoint_leaves_no_temporary_file(reference, monkeypatch, capsys):
    root, _ = reference
    run_dir = root / "ctrl-c-save"
    save, epoch = torch.save, 1  # epoch 1 saves every best_*.pt

    def interrupted(obj, path, *a, **k):
        if "best_" in str(path) and obj.get("epoch") == epoch:
            open(path, "wb").write(b"half")  # a partly written file, then Ctrl-C
            raise KeyboardInterrupt
        return save(obj, path, *a, **k)
    monkeypatch.setattr(training.torch, "save", interrupted)
    assert training.main(vars(trainer2), tiny_args(root, run_dir)) == 130
    assert f"last.pt holds the end of epoch {epoch}" in capsys.readouterr().err
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_budget_cut_epoch_counts_and_a_resume_starts_the_next(reference, monkeypatch, capsys):
    """The budget runs out at step 5, the second step of epoch 2 (3 steps an epoch)."""
    root, _ = reference
    run_dir = root / "budget"
    monkeypatch.setattr(training.Budget, "expired", lambda self, step: step >= 4)
    assert training.main(vars(trainer2), tiny_args(root, run_dir, epochs=1000,
                                                   max_minutes=1)) == 0
    assert "epoch 2 was cut short and counts as an epoch" in capsys.readouterr().out
    last = torch.load(run_dir / "last.pt", weights_only=True)["state"]
    assert last["cut_short"] and last["epoch"] == 2 and last["step"] == 4
    assert [int(r["epoch"]) for r in rows(run_dir)] == [1, 2]
    monkeypatch.setattr(training.Budget, "expired", lambda self, step: False)
    assert training.main(vars(trainer2), [f"--resume={run_dir}", "--epochs=4"]) == 0
    assert [int(r["epoch"]) for r in rows(run_dir)] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in rows(run_dir)] == [3, 4, 7, 10]  # epoch 3 starts afresh


class Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > /tmp/lfw_evil_marker",))


@pytest.mark.parametrize("damage", ["truncated", "malicious"])
def test_a_damaged_last_pt_is_one_line(reference, tmp_path, capsys, damage):
    root, full = reference
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_bytes((full / "config.json").read_bytes())
    data = (full / "last.pt").read_bytes()[:1000] if damage == "truncated" else \
        pickle.dumps({"state": Evil()}, protocol=2)
    (run_dir / "last.pt").write_bytes(data)
    assert training.main(vars(trainer2), [f"--resume={run_dir}"]) == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "last.pt: cannot load it" in err
    assert "weights_only" not in err and not os.path.exists("/tmp/lfw_evil_marker")


def test_a_corrupt_image_names_the_file_and_the_fix(reference, tmp_path, capsys):
    import shutil
    root, _ = reference
    data = tmp_path / "images"
    shutil.copytree(root / "images", data)
    bad = data / "Train_Person_03" / "Train_Person_03_0002.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    code = training.main(vars(trainer2), tiny_args(root, tmp_path / "run", data_dir=data))
    err = capsys.readouterr().err
    assert code == 1 and len(error_lines(err)) == 1
    assert f"{bad}: not a readable image" in err and "crop_dataset_to_faces.py --overwrite" in err


@pytest.mark.parametrize("bad", ["batch_size=0", "epochs=0", "ema=1.5", "model=vgg"])
def test_bad_settings_leave_no_run_folder(reference, tmp_path, bad):
    root, _ = reference
    name, value = bad.split("=")
    with pytest.raises(SystemExit, match=f"{name}"):
        training.main(vars(trainer2), tiny_args(root, tmp_path / "run", **{name: value}))
    assert not (tmp_path / "run").exists()


def test_a_protocol_file_that_is_not_utf8_is_one_line(reference, tmp_path, capsys):
    """evaluate.py and training share the parsers: a Latin-1 byte on line 3 names the line."""
    import evaluate
    root, full = reference
    proto = tmp_path / "proto"
    proto.mkdir()
    lines = (root / "pairsDevTest.txt").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Test", b"T\xe9st")
    (proto / "pairsDevTest.txt").write_bytes(b"\n".join(lines))
    (proto / "peopleDevTrain.txt").write_bytes((root / "peopleDevTrain.txt").read_bytes())
    code = evaluate.main([str(full / "best_accuracy.pt"), "--pairs", str(proto / "pairsDevTest.txt"),
                          "--data", str(root / "images")])
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1
    assert f"{proto / 'pairsDevTest.txt'}:3: not UTF-8 text (byte 0xe9)" in err
    # Training reads only the training people (never the test pairs) and names the line too.
    lines = (root / "peopleDevTrain.txt").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"Train", b"Tr\xe9in")
    (proto / "peopleDevTrain.txt").write_bytes(b"\n".join(lines))
    code = training.main(vars(trainer2), tiny_args(root, tmp_path / "run", protocol_dir=proto))
    err = capsys.readouterr().err
    assert code == 1 and "peopleDevTrain.txt:3: not UTF-8 text" in err and len(error_lines(err)) == 1
