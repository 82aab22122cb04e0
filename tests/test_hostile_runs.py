"""Hostile inputs to the ship step and the resumable runners, and writers racing on one file
(issue 21, items 2, 4, 7 and 8): a bad input is one line and exit 2, and nothing is replaced
or deleted; concurrent writers each replace the file whole."""
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import ablations
import benchmark
import experiments
import ship_model
import training
import trainer2
from conftest import small_lfw, tiny_args
from runtime import write_atomic

ROOT = Path(__file__).resolve().parent.parent
OLD_MODEL, OLD_CARD = b"the model shipped before", "# the card shipped before\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship")
    small_lfw(root)
    assert training.main(vars(trainer2), tiny_args(root, root / "run", epochs=1)) == 0
    return root / "run" / "best_accuracy.pt"


@pytest.fixture
def shipped(tmp_path):
    """A models/ folder holding a shipped model and its card, as the repository does."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "lfw-compact.pt").write_bytes(OLD_MODEL)
    (models / "MODEL_CARD.md").write_text(OLD_CARD)
    return models


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def view1_report(ckpt):
    return {"checkpoint": str(ckpt), "checkpoint_sha256": sha256(ckpt), "flip": False,
            "kfold": {"mean": 0.8125, "std": 0.02, "stderr": 0.0063}, "auc": 0.9012,
            "tar@far=1e-3": 0.25}


def identify_report(ckpt):
    return {"checkpoint": str(ckpt), "checkpoint_sha256": sha256(ckpt), "rank1": 0.5,
            "rank5": 0.75, "dir@far=0.01": None, "dir@far=0.1": 0.4}


def ship(checkpoint, models, *extra):
    return ship_model.main([str(checkpoint), "--out", str(models / "lfw-compact.pt"),
                            *map(str, extra)])


def assert_untouched(models, capsys, *words):
    """The old model and card as they were, no temporary file left, one error line."""
    assert (models / "lfw-compact.pt").read_bytes() == OLD_MODEL
    assert (models / "MODEL_CARD.md").read_text() == OLD_CARD
    assert sorted(p.name for p in models.iterdir()) == ["MODEL_CARD.md", "lfw-compact.pt"]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, err


# ------------------------------------------------------------------ item 2: the size check

def test_a_too_large_export_keeps_the_shipped_model_and_card(checkpoint, shipped, capsys,
                                                             monkeypatch):
    monkeypatch.setattr(ship_model, "MAX_MB", 1e-4)  # the tiny test network is over 100 bytes
    assert ship(checkpoint, shipped) == 2
    assert_untouched(shipped, capsys, "MB", "lfw-compact.pt", "smaller network")


# ------------------------------------------------------------------ item 4: inputs first

def test_an_identify_report_given_as_view1_is_refused_before_anything_is_written(
        checkpoint, shipped, tmp_path, capsys):
    wrong = tmp_path / "identify-results.json"
    wrong.write_text(json.dumps(identify_report(checkpoint)))
    assert ship(checkpoint, shipped, "--view1", wrong) == 2
    assert_untouched(shipped, capsys, str(wrong), "--view1", "pass it as --identify")
    # and the other way round
    view1 = tmp_path / "view1-results.json"
    view1.write_text(json.dumps(view1_report(checkpoint)))
    assert ship(checkpoint, shipped, "--identify", view1) == 2
    assert_untouched(shipped, capsys, str(view1), "pass it as --view1")


@pytest.mark.parametrize("option, make, words", [
    ("--view1", lambda p: None, ["does not exist"]),
    ("--identify", lambda p: p.mkdir(), ["is a folder"]),
    ("--view1", lambda p: p.write_text('{"kfold": {"mean": 0.8'), ["cannot be read as JSON"]),
    ("--view1", lambda p: p.write_text("[]"), ["no kfold.mean"]),
    ("--identify", lambda p: p.write_text('{"rank1": "high", "rank5": 0.9}'), ["no rank1"]),
    ("--identify", lambda p: p.write_text('{"rank1": 0.5, "rank5": 0.9}'), ["dir@far=0.01"]),
])
def test_a_missing_or_wrong_report_is_one_line_and_nothing_is_replaced(
        checkpoint, shipped, tmp_path, capsys, option, make, words):
    report = tmp_path / "results.json"
    make(report)
    assert ship(checkpoint, shipped, option, report) == 2
    assert_untouched(shipped, capsys, str(report), option, *words)


def test_a_report_of_another_checkpoint_is_refused(checkpoint, shipped, tmp_path, capsys):
    report = view1_report(checkpoint)
    report["checkpoint_sha256"] = "0" * 64
    (tmp_path / "results.json").write_text(json.dumps(report))
    assert ship(checkpoint, shipped, "--view1", tmp_path / "results.json") == 2
    assert_untouched(shipped, capsys, "checkpoint_sha256", str(checkpoint))


def test_when_the_card_cannot_be_written_the_model_is_not_replaced(checkpoint, shipped,
                                                                   capsys):
    (shipped / "MODEL_CARD.md").unlink()
    (shipped / "MODEL_CARD.md").mkdir()  # a card that cannot be replaced
    assert ship(checkpoint, shipped) == 2
    assert (shipped / "lfw-compact.pt").read_bytes() == OLD_MODEL
    assert sorted(p.name for p in shipped.iterdir()) == ["MODEL_CARD.md", "lfw-compact.pt"]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MODEL_CARD.md" in err and "folder" in err


def test_good_reports_replace_the_model_and_its_card_together(checkpoint, shipped, tmp_path):
    (tmp_path / "v.json").write_text(json.dumps(view1_report(checkpoint)))
    (tmp_path / "i.json").write_text(json.dumps(identify_report(checkpoint)))
    assert ship(checkpoint, shipped, "--view1", tmp_path / "v.json", "--identify",
                tmp_path / "i.json") == 0
    card = (shipped / "MODEL_CARD.md").read_text()
    assert "81.25%" in card and "0.9012" in card and "rank-1 50.00%" in card
    assert (shipped / "lfw-compact.pt").read_bytes() != OLD_MODEL
    assert sorted(p.name for p in shipped.iterdir()) == ["MODEL_CARD.md", "lfw-compact.pt"]


# ------------------------------------------------------------------ item 7: racing writers

def payload(writer, size=1 << 20):
    """WRITER's complete file: its id, its body, and the body's hash, so a damaged copy shows."""
    body = bytes([writer % 251]) * size
    return f"{writer}\n{hashlib.sha256(body).hexdigest()}\n".encode() + body


def is_whole(data):
    head, digest, body = data.split(b"\n", 2)
    return hashlib.sha256(body).hexdigest().encode() == digest


def test_concurrent_writers_each_replace_the_file_whole_and_a_reader_sees_no_damage(tmp_path):
    target, writers = tmp_path / "cache.pt", 6
    target.write_bytes(payload(99))
    # Every writer is half-way through its file when the others are: a shared temporary
    # file would be truncated and interleaved, and all but one rename would fail.
    middle = threading.Barrier(writers)
    failures, damaged, done = [], [], threading.Event()

    def write(k):
        data = payload(k)

        def halves(tmp):
            with open(tmp, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                middle.wait(timeout=60)
                f.write(data[len(data) // 2:])
        try:
            write_atomic(target, write=halves)
        except Exception as e:  # noqa: BLE001 (every failure is the finding)
            failures.append(repr(e))
            middle.abort()

    def read():
        while not done.is_set():
            data = target.read_bytes()
            if not is_whole(data):
                damaged.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert failures == [] and damaged == []
    final = target.read_bytes()
    assert is_whole(final) and int(final.split(b"\n")[0]) in range(writers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]  # no temporary left


WRITER = """
import hashlib, sys
from runtime import write_atomic
for i in range(int(sys.argv[2])):
    body = bytes([i]) * (1 << 16)
    write_atomic(sys.argv[1], f"{i}\\n{hashlib.sha256(body).hexdigest()}\\n".encode() + body)
"""


def test_concurrent_writer_processes_all_succeed(tmp_path):
    """As two identify.py processes saving one gallery cache do."""
    target = tmp_path / "cache.pt"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), "40"], cwd=ROOT,
                              stderr=subprocess.PIPE)
             for _ in range(4)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    assert is_whole(target.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    seen = []

    def fail(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, write=fail)
    assert target.read_text() == "old" and seen[0].parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_write_function_makes_the_file_itself_so_a_hard_link_stays_one(tmp_path):
    """training.save_checkpoint links best_auc.pt to best_accuracy.pt through write_atomic."""
    import os
    (tmp_path / "best_accuracy.pt").write_bytes(b"weights")
    (tmp_path / "best_auc.pt").write_bytes(b"older weights")
    write_atomic(tmp_path / "best_auc.pt",
                 write=lambda tmp: os.link(tmp_path / "best_accuracy.pt", tmp))
    assert (tmp_path / "best_auc.pt").samefile(tmp_path / "best_accuracy.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_accuracy.pt", "best_auc.pt"]


def test_a_new_file_gets_ordinary_permissions_and_a_replaced_one_keeps_its_own(tmp_path):
    import os
    mask = os.umask(0o022)
    os.umask(mask)
    write_atomic(tmp_path / "new.json", "{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    (tmp_path / "shared.json").write_text("{}")
    (tmp_path / "shared.json").chmod(0o640)
    write_atomic(tmp_path / "shared.json", b"[]")
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------ item 8: bad state files

BAD_STATES = [
    ("[]", "an array"),
    ('"hello"', "a string"),
    ("null", "null"),
    ("42", "a number"),
    ('{"seed-train": "done"}', "'seed-train' is a string"),
    ('{"seed-train": {"seconds": 3.0}}', "no log"),
    ('{"seed-train": {"seconds": "3", "log": "a.log"}}', "a string as seconds"),
    ('{"seed-train": {"seconds": 3.0, "log": "a.log", "com', "cannot be read as JSON"),
    ("", "cannot be read as JSON"),
]


def finished_run(run_dir, out):
    """A finished training run that this command's --out made (so it may claim the folder)."""
    run_dir.mkdir(parents=True)
    files = {"best_accuracy.pt": "weights", "config.json": "{}",
             "metrics.csv": "epoch,accuracy\n1,0.9\n"}
    for name, text in files.items():
        (run_dir / name).write_text(text)
    (run_dir / "benchmark_out.txt").write_text(str(Path(out).resolve()))
    return {**files, "benchmark_out.txt": str(Path(out).resolve())}


def no_steps(*a, **k):
    raise AssertionError("a step ran although the state file is bad")


def assert_bad_state(capsys, code, path, words):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}: "), err
    assert words in err and "delete it" in err, err


def ablation_args(tmp_path, out, logs):
    small_lfw(tmp_path / "lfw")
    return ablations, "ablation-seed", ["--rows", "1", "--data-root", str(tmp_path / "lfw"),
                                        "--crops", str(tmp_path / "lfw" / "images")]


def benchmark_args(tmp_path, out, logs):
    data = tmp_path / "dataset"
    small_lfw(data)
    (data / "pairs.txt").write_text("1\t1\n")
    return benchmark, "bench-view1-seed", ["--protocol", "view1", "--recipes", "seed",
                                           "--data-root", str(data),
                                           "--crops", str(tmp_path / "crops")]


@pytest.mark.parametrize("script", [ablation_args, benchmark_args])
@pytest.mark.parametrize("text, words", BAD_STATES)
def test_a_bad_state_is_one_line_and_deletes_no_finished_run(tmp_path, monkeypatch, capsys,
                                                             script, text, words):
    """ablations.py and benchmark.py: a finished run's folder and the state file survive,
    no step runs and (benchmark) no crop folder is made."""
    out, logs = tmp_path / "results", tmp_path / "logs"
    module, run_name, args = script(tmp_path, out, logs)
    files = finished_run(logs / run_name, out)
    (out / "cache").mkdir(parents=True)
    (out / "cache" / "state.json").write_text(text)
    monkeypatch.setattr(module, "run_step", no_steps)
    with pytest.raises(SystemExit) as e:
        module.main(args + ["--out", str(out), "--logs", str(logs), "--docs", ""])
    assert_bad_state(capsys, e.value.code, out / "cache" / "state.json", words)
    assert {p.name: p.read_text() for p in (logs / run_name).iterdir()} == files
    assert (out / "cache" / "state.json").read_text() == text
    assert not (tmp_path / "crops").exists()


def test_a_good_state_is_read_as_it_was_written(tmp_path):
    state = {"seed-train": {"seconds": 3.5, "log": "a.log", "commit": "abc", "peak_rss_mb": 9},
             "crop": {"seconds": 1, "log": "b.log"}}  # an older state: no commit, no memory
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert experiments.read_state(tmp_path / "state.json") == state
    assert experiments.read_state(tmp_path / "absent.json") == {}


TABLES = ablations.ROWS[0]
GOOD_RESULT = {
    "command": "python ablations.py", "git_commit": "0123456789ab", "minutes": 1,
    "machine": "cpu", "runs": {name: {"accuracy": 0.6, "auc": 0.65, "train_accuracy": 0.7,
                                      "val_accuracy": 0.6} for name in TABLES[2:4]},
    "rows": [{"id": TABLES[0], "claim": TABLES[1], "base": TABLES[2], "variant": TABLES[3],
              "expect": TABLES[4], "difference": 0.0, "low": -0.01, "high": 0.01,
              "n_pairs": 1000, "verdict": "inconclusive"}]}


def result_with(**changes):
    result = json.loads(json.dumps(GOOD_RESULT))
    for key, value in changes.items():
        if key.startswith("row_"):
            result["rows"][0][key[4:]] = value
        else:
            result[key] = value
    return json.dumps(result)


@pytest.mark.parametrize("text, words", [
    (result_with()[:-20], "cannot be read as JSON"),
    ("[]", "an array"),
    ("null", "null"),
    (result_with(rows="hello"), "a string as rows"),
    (result_with(runs=None), "null as runs"),
    (result_with(row_verdict=None), "verdict"),
    (result_with(row_base="no-such-run"), "does not know"),
    (result_with(row_low="low"), "lacks a figure"),
])
def test_tables_only_with_a_bad_ablations_json_is_one_line(tmp_path, capsys, text, words):
    out = tmp_path / "results"
    out.mkdir()
    (out / "ablations.json").write_text(text)
    (out / "ablations.md").write_text("the table before")
    with pytest.raises(SystemExit) as e:
        ablations.main(["--tables-only", "--out", str(out), "--docs", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {out / 'ablations.json'}: ")
    assert words in err, err
    assert (out / "ablations.md").read_text() == "the table before"


def test_tables_only_with_a_good_ablations_json_writes_the_table(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "ablations.json").write_text(result_with())
    assert ablations.main(["--tables-only", "--out", str(out), "--docs", ""]) == 0
    assert "**inconclusive**" in (out / "ablations.md").read_text()


@pytest.mark.parametrize("text", ['{"view1": {}, "command": "x"', "[]", '{"view1": []}'])
def test_tables_only_with_a_bad_benchmark_json_is_one_line(tmp_path, capsys, text):
    (tmp_path / "benchmark.json").write_text(text)
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--tables-only", "--out", str(tmp_path), "--docs", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "benchmark.json") in err


# ------------------------------------------------------------------ the renamed settings

def test_every_ablation_run_and_recipe_names_settings_the_trainer_has():
    """An override naming a setting that moved or was renamed (--margin became
    --triplet_margin) would fail every such run hours into ablations.py."""
    args = ablations.parse_args([])
    for name in ablations.RUNS:  # load_config exits on an unknown name or a bad value
        experiments.trainer_config(ablations.train_command(args, name))
    for recipe, paths in benchmark.PROFILES.items():
        defaults = training.defaults_of(experiments.trainer_namespace(
            experiments.RECIPES[recipe]["trainer"]))
        for extra in paths.values():
            training.apply_overrides(defaults, extra)
