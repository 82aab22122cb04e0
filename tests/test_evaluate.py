"""evaluate.py: the report against hand-computed and sklearn figures, View 2 folds, end to end
on a tiny checkpoint, contamination, missing images and embed-once."""
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

import dataset as ds
import evaluate
import model as m
import training
import trainer2
from conftest import LFW_DIR, needs_lfw, tiny_args, write_people, write_view1_protocol

OUTPUTS = ("results.json", "roc.png", "scores.png", "errors.png")
BF16_TOLERANCE = 0.02  # cosine scores: bf16 keeps 8 bits of mantissa
TRAIN = {f"Train_Person_{k:02d}": 4 + k % 3 for k in range(16)}
TEST = {f"Test_Person_{k:02d}": 3 + k % 2 for k in range(8)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint trained once on synthetic people (as conftest's synthetic_lfw lays them
    out). Returns (root, checkpoint path). Trained and validated in fp32 (mixed_precision
    off), so evaluate.py embeds in fp32 too and its figures can be compared exactly with an
    fp32 reference; mixed_precision_copy makes the bf16 variant."""
    root = tmp_path_factory.mktemp("lfw")
    write_people(root / "images", {**TRAIN, **TEST})
    write_view1_protocol(root, TRAIN, TEST)
    assert training.main(vars(trainer2), tiny_args(root, root / "run", epochs=2,
                                                   mixed_precision=False)) == 0
    return root, root / "run" / "best_accuracy.pt"


def write_pairs(path, folds):
    """A pairs file from [(matched, mismatched)] per fold; one fold gives the single-set header."""
    n = len(folds[0][0])
    header = str(n) if len(folds) == 1 else f"{len(folds)}\t{n}"
    lines = [header]
    for matched, mismatched in folds:
        lines += [f"{a}\t{i}\t{j}" for a, i, j in matched]
        lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in mismatched]
    path.write_text("\n".join(lines) + "\n")
    return path


def mixed_precision_copy(ckpt, path):
    """The same weights, marked as trained with mixed_precision on (bf16 on the CPU)."""
    saved = torch.load(ckpt, weights_only=True)
    saved["config"]["mixed_precision"] = True
    torch.save(saved, path)
    return path


def naive_scores(net, root, pairs, amp):
    """Every pair scored on its own, images read from disk, in the given precision."""
    return np.array([m.score_faces(net, 32, ds.load_image(ds.image_path(root / "images", a, i)),
                                   ds.load_image(ds.image_path(root / "images", b, j)), amp=amp)
                     for a, i, b, j, _, _ in pairs])


def csv_scores(path):
    with open(path, newline="") as f:
        return np.array([float(row["score"]) for row in csv.DictReader(f)])


def run(capsys, *argv):
    code = evaluate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the report, by hand

# 10 folds of 5 same + 5 different pairs. Same scores sit above every different score except
# one planted false reject (0.25) in fold 0, so every fold's training threshold is 0.5 (the
# only midpoint between 0.4 and 0.6) and each test fold's accuracy is fixed.
SAME = [0.6, 0.7, 0.8, 0.9, 0.95]
DIFF = [0.1, 0.2, 0.3, 0.35, 0.4]


def planted():
    scores, labels, folds = [], [], []
    for k in range(10):
        same = [0.25] + SAME[1:] if k == 0 else SAME
        scores += same + DIFF
        labels += [1] * 5 + [0] * 5
        folds += [k] * 10
    return np.array(scores), np.array(labels), np.array(folds)


def check_planted(r, scores, labels):
    # By hand: fold 0 gets 9/10, the others 10/10.
    assert r["kfold"]["fold_accuracies"] == pytest.approx([0.9] + [1.0] * 9)
    assert r["kfold"]["mean"] == pytest.approx(0.99)
    assert r["kfold"]["std"] == pytest.approx(np.sqrt(0.001))  # (0.09² + 9 × 0.01²) / 9
    assert r["kfold"]["stderr"] == pytest.approx(0.01)
    assert r["kfold"]["thresholds"] == pytest.approx([0.5] * 10)
    # The outlier beats the 20 different pairs scored 0.1 and 0.2: (49 × 50 + 20) / 2500.
    assert r["auc"] == pytest.approx(0.988)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores))
    # No false accept is allowed at FAR <= 1e-2 of 50 negatives: TAR 49/50. The ROC runs from
    # (FAR 0, FRR 0.02) to (FAR 0.2, FRR 0.02), crossing FAR = FRR at 0.02.
    assert r["tar@far=1e-2"] == r["tar@far=1e-3"] == pytest.approx(0.98)
    assert r["eer"] == pytest.approx(0.02)
    predicted = scores >= 0.5
    p, rec, f1, _ = precision_recall_fscore_support(labels, predicted, average="binary")
    at = r["at_threshold"]
    assert at["threshold"] == pytest.approx(0.5)
    assert (at["precision"], at["recall"], at["f1"]) == pytest.approx((p, rec, f1))
    assert (at["precision"], at["recall"]) == pytest.approx((1.0, 0.98))
    assert at["accuracy"] == pytest.approx(accuracy_score(labels, predicted)) == 0.99


def test_report_matches_hand_and_sklearn():
    scores, labels, folds = planted()
    r = evaluate.make_report(scores, labels, folds, val_threshold=0.65)
    check_planted(r, scores, labels)
    # At 0.65 each fold accepts 4 of its 5 same pairs and no different one: 90/100.
    assert r["at_validation_threshold"]["accuracy"] == pytest.approx(0.9) == \
        accuracy_score(labels, scores >= 0.65)


def planted_pairs_file(tmp_path):
    """A 10-fold pairs file of training people, laid out like planted()'s scores."""
    names = sorted(n for n in TRAIN if TRAIN[n] >= 2)
    folds = [([(names[(k + i) % 16], 1, 2) for i in range(5)],
              [(names[(k + i) % 16], 1, names[(k + i + 1) % 16], 3) for i in range(5)])
             for k in range(10)]
    return write_pairs(tmp_path / "pairs.txt", folds)


def plant(monkeypatch, scores):
    """Let model.score_pairs embed as usual, then hand back the planted scores."""
    real = m.score_pairs

    def planted_scores(*a, **k):
        return {**real(*a, **k), "scores": scores.copy()}
    monkeypatch.setattr(m, "score_pairs", planted_scores)


def test_planted_scores_reach_results_json(tiny, tmp_path, capsys, monkeypatch):
    """The same planted scores through main(): a 10-fold file of training people, so it is
    also contaminated."""
    root, ckpt = tiny
    pairs = planted_pairs_file(tmp_path)
    scores, labels, _ = planted()
    plant(monkeypatch, scores)
    code, out, _ = run(capsys, ckpt, "--pairs", pairs, "--out", tmp_path / "out")
    assert code == 0
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    check_planted(r, scores, labels)
    assert r["protocol"] == "10 official folds" and r["n_pairs"] == 100
    people = ds.pair_people(ds.parse_pairs(pairs))
    assert r["contaminated"] is True
    assert r["people_seen_in_training"] == r["people_in_pairs"] == len(people)
    assert f"WARNING: {len(people)} of {len(people)} people in pairs.txt were seen in training: " \
           "this result is contaminated" in out


def test_one_fold_as_test_set_takes_its_threshold_from_the_other_folds(tiny, tmp_path, capsys,
                                                                        monkeypatch):
    """--fold 0 on the planted scores: every other fold puts the threshold at 0.5, so fold 0
    scores 9/10 (its planted false reject), and only fold 0's pairs are reported."""
    root, ckpt = tiny
    pairs = planted_pairs_file(tmp_path)
    scores, labels, _ = planted()
    plant(monkeypatch, scores)
    code, out, _ = run(capsys, ckpt, "--pairs", pairs, "--out", tmp_path / "out", "--fold", 0)
    assert code == 0
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert r["test_fold"]["fold"] == 0 and r["test_fold"]["threshold"] == pytest.approx(0.5)
    assert r["test_fold"]["accuracy"] == pytest.approx(0.9) and r["n_pairs"] == 10
    assert r["people_in_pairs"] == len(ds.pair_people(ds.parse_pairs(pairs)[:10]))
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[0].startswith("name_a,number_a")
    assert "fold 0   accuracy 0.9000" in out
    code, _, err = run(capsys, ckpt, "--pairs", pairs, "--out", tmp_path / "o2", "--fold", 12)
    assert code == 1 and "has no official fold 12" in err


# ---------------------------------------------------------------- folds

def test_view2_folds_follow_the_file_layout(tmp_path):
    # Header '10\t3': fold k is lines k*6+2 .. k*6+7, three matched then three mismatched.
    lines = ["10\t3"]
    for lineno in range(2, 62):
        matched = (lineno - 2) % 6 < 3
        lines.append(f"L{lineno}\t1\t2" if matched else f"L{lineno}\t1\tM{lineno}\t1")
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs = ds.parse_pairs(tmp_path / "pairs.txt")
    folds, protocol = evaluate.pair_folds(pairs)
    assert protocol == "10 official folds"
    for (name, _, _, _, same, _), fold in zip(pairs, folds):
        lineno = int(name[1:])
        assert fold == (lineno - 2) // 6
        assert same == ((lineno - 2) % 6 < 3)


def test_single_set_file_gets_ten_balanced_folds(tiny):
    root, _ = tiny
    pairs = ds.parse_pairs(root / "pairsDevTest.txt")  # 20 + 20 pairs
    folds, protocol = evaluate.pair_folds(pairs)
    labels = np.array([p[4] for p in pairs])
    assert "10 class-balanced folds" in protocol
    for k in range(10):
        assert (labels[folds == k] == 1).sum() == (labels[folds == k] == 0).sum() == 2


@needs_lfw
def test_real_pairs_txt_has_ten_folds_of_300_and_300():
    path = Path(LFW_DIR) / "pairs.txt"
    pairs = ds.parse_pairs(path)
    folds, protocol = evaluate.pair_folds(pairs)
    labels = np.array([p[4] for p in pairs])
    assert protocol == "10 official folds" and len(pairs) == 6000
    body = path.read_text().splitlines()[1:]
    for k in range(10):
        assert (labels[folds == k] == 1).sum() == (labels[folds == k] == 0).sum() == 300
        # Fold k is the file's lines k*600+2 .. k*600+601: matched first, then mismatched.
        assert body[k * 600].split()[0] == pairs[k * 600][0] and pairs[k * 600][4] == 1
        assert body[k * 600 + 300].split()[2] == pairs[k * 600 + 300][2]


# ---------------------------------------------------------------- end to end

def test_end_to_end_writes_every_output_and_matches_naive_scoring(tiny, capsys):
    root, ckpt = tiny
    code, out, _ = run(capsys, ckpt, "--pairs", root / "pairsDevTest.txt")
    assert code == 0
    out_dir = ckpt.parent / "eval-pairsDevTest"  # the default --out
    for name in OUTPUTS:
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    r = json.loads((out_dir / "results.json").read_text())
    assert r["contaminated"] is False and r["people_seen_in_training"] == 0
    assert r["people_in_pairs"] == len(ds.pair_people(ds.parse_pairs(root / "pairsDevTest.txt")))
    assert r["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert r["data"] == str(root / "images") and r["data_source"] == "the checkpoint's data_dir"
    assert r["flip"] is False and r["n_pairs"] == 40 and r["pairs_skipped"] == 0
    assert set(r["time_s"]) == {"decode", "embed", "score", "total"}
    assert "contaminated" not in out and "embed" in out and "accuracy" in out

    # Naive reference: every pair scored on its own, figures from sklearn. Like with like: the
    # checkpoint is fp32 (mixed_precision off), so evaluate.py and the reference both embed in
    # fp32 and agree to rounding.
    net, saved = m.load_checkpoint(ckpt)
    assert saved["config"]["mixed_precision"] is False
    pairs = ds.parse_pairs(root / "pairsDevTest.txt")
    scores = naive_scores(net, root, pairs, amp=False)
    labels = np.array([p[4] for p in pairs])
    assert csv_scores(out_dir / "scores.csv") == pytest.approx(scores, rel=1e-5, abs=1e-6)
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    v = r["at_validation_threshold"]
    assert v["threshold"] == pytest.approx(saved["threshold"])
    assert v["accuracy"] == pytest.approx(accuracy_score(labels, scores >= saved["threshold"]))
    # Each fold's threshold is one of the best on the other folds, and its test accuracy is
    # what sklearn gives at that threshold.
    folds = evaluate.pair_folds(pairs)[0]
    candidates = np.concatenate([np.sort(scores) - 1e-9, [scores.max() + 1]])
    for k, (t, acc) in enumerate(zip(r["kfold"]["thresholds"], r["kfold"]["fold_accuracies"])):
        train = folds != k
        best = max(accuracy_score(labels[train], scores[train] >= c) for c in candidates)
        assert accuracy_score(labels[train], scores[train] >= t) == pytest.approx(best)
        assert acc == pytest.approx(accuracy_score(labels[folds == k], scores[folds == k] >= t))
    assert r["kfold"]["mean"] == pytest.approx(np.mean(r["kfold"]["fold_accuracies"]))


def test_mixed_precision_checkpoint_is_embedded_in_bf16(tiny, tmp_path, capsys):
    """A checkpoint trained with mixed_precision is embedded under bf16 autocast, as it was
    validated, so its scores match a bf16 reference (to bf16 rounding, which depends on the
    batch) and not the fp32 scores of the same weights."""
    root, ckpt = tiny
    amp = mixed_precision_copy(ckpt, tmp_path / "amp.pt")
    code, _, _ = run(capsys, amp, "--pairs", root / "pairsDevTest.txt", "--out", tmp_path / "o")
    assert code == 0
    got = csv_scores(tmp_path / "o" / "scores.csv")
    net, _ = m.load_checkpoint(amp)
    pairs = ds.parse_pairs(root / "pairsDevTest.txt")
    bf16, fp32 = naive_scores(net, root, pairs, amp=True), naive_scores(net, root, pairs, amp=False)
    to_bf16, to_fp32 = np.abs(got - bf16).max(), np.abs(got - fp32).max()
    assert to_bf16 < BF16_TOLERANCE and to_bf16 < to_fp32 / 2


def test_flip_goes_to_its_own_folder_and_notes_the_threshold(tiny, capsys):
    root, ckpt = tiny
    code, out, _ = run(capsys, ckpt, "--pairs", root / "pairsDevTest.txt", "--flip")
    assert code == 0
    r = json.loads((ckpt.parent / "eval-pairsDevTest-flip" / "results.json").read_text())
    assert r["flip"] is True and "may not transfer" in out


def test_each_unique_image_is_embedded_once(tiny, tmp_path, capsys, monkeypatch):
    root, ckpt = tiny
    # Duplicates: the same pair twice, and images shared between matched and mismatched pairs.
    pairs = write_pairs(tmp_path / "dups.txt", [(
        [("Test_Person_00", 1, 2), ("Test_Person_00", 1, 2), ("Test_Person_01", 1, 3)],
        [("Test_Person_00", 1, "Test_Person_01", 1), ("Test_Person_00", 2, "Test_Person_01", 3),
         ("Test_Person_02", 1, "Test_Person_00", 1)])])
    seen = []
    load = m.load_checkpoint

    def counting_load(*a, **kw):
        net, saved = load(*a, **kw)
        embed = net.embed

        def counted(x):
            seen.extend(hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x)
            return embed(x)
        net.embed = counted
        return net, saved
    monkeypatch.setattr(m, "load_checkpoint", counting_load)
    for pairs_file, n_unique in ((pairs, 5), (root / "pairsDevTest.txt", None)):
        seen.clear()
        assert run(capsys, ckpt, "--pairs", pairs_file, "--out", tmp_path / "o",
                   "--batch-size", 4)[0] == 0
        parsed = ds.parse_pairs(pairs_file)
        unique = {(a, i) for p in parsed for a, i in ((p[0], p[1]), (p[2], p[3]))}
        assert n_unique is None or len(unique) == n_unique
        assert len(seen) == len(set(seen)) == len(unique)


# ---------------------------------------------------------------- bad input

def test_missing_images_name_the_files_and_skip_missing_works(tiny, tmp_path, capsys):
    root, ckpt = tiny
    pairs = write_pairs(tmp_path / "missing.txt", [(
        [("Test_Person_00", 1, 9), ("Test_Person_01", 1, 2), ("Test_Person_02", 1, 2)],
        [("Test_Person_00", 1, "Test_Person_01", 1), ("Test_Person_02", 1, "Test_Person_03", 1),
         ("Test_Person_04", 1, "Test_Person_05", 1)])])
    code, out, err = run(capsys, ckpt, "--pairs", pairs, "--out", tmp_path / "o")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "Test_Person_00_0009.jpg" in err and "crop_dataset_to_faces.py" in err \
        and "--skip-missing" in err
    code, out, err = run(capsys, ckpt, "--pairs", pairs, "--out", tmp_path / "o", "--skip-missing")
    assert code == 0
    r = json.loads((tmp_path / "o" / "results.json").read_text())
    assert r["pairs_skipped"] == 1 and r["n_pairs"] == 5 and "skipped 1 pairs" in out


def test_bad_checkpoint_or_pairs_is_one_clear_line(tiny, tmp_path, capsys):
    root, ckpt = tiny
    pairs = root / "pairsDevTest.txt"
    code, _, err = run(capsys, tmp_path / "nope.pt", "--pairs", pairs)
    assert code == 1 and "nope.pt: no such checkpoint" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "broken.pt").write_bytes(ckpt.read_bytes()[:1000])
    code, _, err = run(capsys, tmp_path / "broken.pt", "--pairs", pairs)
    assert code == 1 and "broken.pt: cannot load it (it is truncated or not a PyTorch file)" in err
    assert len(err.strip().splitlines()) == 1
    saved = torch.load(ckpt, weights_only=True)
    saved["model_config"]["embedding_dim"] = 16  # as if model.py had changed since training
    torch.save(saved, tmp_path / "other.pt")
    code, _, err = run(capsys, tmp_path / "other.pt", "--pairs", pairs)
    assert code == 1 and "other.pt: its weights do not fit the network model.py builds" in err
    (tmp_path / "bad.txt").write_text("3\nA\t1\t2\n")
    code, _, err = run(capsys, ckpt, "--pairs", tmp_path / "bad.txt")
    assert code == 1 and "bad.txt" in err and "re-fetch" in err
    assert len(err.strip().splitlines()) == 1


def test_fold_needs_a_file_with_official_folds(tiny, capsys):
    root, ckpt = tiny
    code, _, err = run(capsys, ckpt, "--pairs", root / "pairsDevTest.txt", "--fold", 3)
    assert code == 1 and "has no official fold 3" in err


def test_compare_reports_the_paired_difference_and_refuses_other_pairs(tmp_path, capsys):
    def scores_csv(folder, scores, names):
        folder.mkdir()
        lines = ["name_a,number_a,name_b,number_b,same,fold,score"]
        lines += [f"{n},1,{n},2,{int(i < 50)},0,{s}" for i, (n, s) in enumerate(zip(names, scores))]
        (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    labels = np.repeat([1, 0], 50)
    names = [f"P{i}" for i in range(100)]
    base = np.where(labels == 1, 1.0, -1.0)
    base[:20] = -1.0  # 20 same pairs missed by the base
    new = base.copy()
    new[:10] = 1.0    # the new model gets 10 of them
    scores_csv(tmp_path / "base", base, names)
    scores_csv(tmp_path / "new", new, names)
    assert evaluate.main(["--compare", str(tmp_path / "base"), str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert "+10.00% accuracy, 95% interval [+" in out and ": better" in out
    assert not (tmp_path / "plots").exists()  # a plot only when asked for
    assert evaluate.main(["--compare", str(tmp_path / "base"), str(tmp_path / "new"),
                          "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "roc_compare.png").stat().st_size > 1000
    scores_csv(tmp_path / "other", new, [n + "x" for n in names])
    assert evaluate.main(["--compare", str(tmp_path / "base"), str(tmp_path / "other")]) == 1
    assert "scored different pairs" in capsys.readouterr().err
