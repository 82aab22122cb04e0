"""evaluate.py: the report against hand-computed and sklearn figures, View 2 folds, end to end
on a tiny checkpoint, contamination, missing images and embed-once."""
import csv
import hashlib
import itertools
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score
from sklearn.model_selection import KFold

import dataset as ds
import evaluate
import metrics
import model as m
import operating_points as op
import pairs as pr
import training
import trainer2
from conftest import LFW_DIR, needs_lfw, tiny_args, write_people, write_view1_protocol
from runtime import autocast

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


@torch.no_grad()
def pair_score(net, face_a, face_b, amp=False, size=32):
    """The reference: one pair on its own, with none of evaluate.py's batching or caching."""
    faces = torch.stack([ds.fit(face_a, size), ds.fit(face_b, size)])
    with autocast(amp, torch.device("cpu")):
        e = net.embed(ds.eval_transform()(faces)).float()
    return float(net.score(e[:1], e[1:]))


def naive_scores(net, root, pairs, amp):
    """Every pair scored on its own, images read from disk, in the given precision."""
    return np.array([pair_score(net, ds.load_image(ds.image_path(root / "images", a, i)),
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
    assert len(rows) == 11 and rows[0] == "path_a,path_b,same,fold,score"
    assert {row.split(",")[3] for row in rows[1:]} == {"0"}  # the test fold's pairs alone
    assert "fold 0   accuracy 0.9000" in out
    code, _, err = run(capsys, ckpt, "--pairs", pairs, "--out", tmp_path / "o2", "--fold", 12)
    assert code == 2 and "has no official fold 12" in err


# ---------------------------------------------------------------- folds

def test_view2_folds_follow_the_file_layout(tmp_path):
    # Header '10\t3': fold k is lines k*6+2 .. k*6+7, three matched then three mismatched.
    lines = ["10\t3"]
    for lineno in range(2, 62):
        matched = (lineno - 2) % 6 < 3
        lines.append(f"L{lineno}\t1\t2" if matched else f"L{lineno}\t1\tM{lineno}\t1")
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    pairs, _ = pr.read_pairs(tmp_path / "pairs.txt", tmp_path)
    folds, protocol = evaluate.pair_folds(pairs, tmp_path / "pairs.txt")
    assert protocol == "10 official folds"
    for pair, fold in zip(pairs, folds):
        lineno = int(pair.path_a.parent.name[1:])
        assert fold == (lineno - 2) // 6
        assert pair.same == ((lineno - 2) % 6 < 3)


def test_single_set_file_gets_ten_balanced_folds(tiny):
    root, _ = tiny
    pairs, _ = pr.read_pairs(root / "pairsDevTest.txt", root / "images")  # 20 + 20 pairs
    folds, protocol = evaluate.pair_folds(pairs, root / "pairsDevTest.txt")
    labels = np.array([p.same for p in pairs])
    assert "10 class-balanced folds" in protocol
    for k in range(10):
        assert (labels[folds == k] == 1).sum() == (labels[folds == k] == 0).sum() == 2


@needs_lfw
def test_real_pairs_txt_has_ten_folds_of_300_and_300():
    path = Path(LFW_DIR) / "pairs.txt"
    pairs, _ = pr.read_pairs(path, "images")
    folds, protocol = evaluate.pair_folds(pairs, path)
    labels = np.array([p.same for p in pairs])
    assert protocol == "10 official folds" and len(pairs) == 6000
    body = path.read_text().splitlines()[1:]
    for k in range(10):
        assert (labels[folds == k] == 1).sum() == (labels[folds == k] == 0).sum() == 300
        # Fold k is the file's lines k*600+2 .. k*600+601: matched first, then mismatched.
        first, mismatched = pairs[k * 600], pairs[k * 600 + 300]
        assert body[k * 600].split()[0] == first.path_a.parent.name and first.same == 1
        assert body[k * 600 + 300].split()[2] == mismatched.path_b.parent.name


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
    # The file's order, each image named under --data: <person>/<image>.
    with open(out_dir / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path_a"], r["path_b"]) for r in rows] == [
        (f"{a}/{a}_{i:04d}.jpg", f"{b}/{b}_{j:04d}.jpg") for a, i, b, j, _, _ in pairs]
    # Today's numbers: metrics.summary of the reference scores, in 10 class-balanced folds.
    today = metrics.summary(scores, labels, metrics.balanced_folds(labels))
    assert r["kfold"]["fold_accuracies"] == pytest.approx(today["kfold"]["fold_accuracies"])
    assert r["protocol"] == "10 class-balanced folds of one set"
    assert r["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    v = r["at_validation_threshold"]
    assert v["threshold"] == pytest.approx(saved["threshold"])
    assert v["accuracy"] == pytest.approx(accuracy_score(labels, scores >= saved["threshold"]))
    # Each fold's threshold is one of the best on the other folds, and its test accuracy is
    # what sklearn gives at that threshold.
    folds = metrics.balanced_folds(labels)
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
    assert code == 2 and len(err.strip().splitlines()) == 1
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
    assert code == 2 and "nope.pt: no such checkpoint" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "broken.pt").write_bytes(ckpt.read_bytes()[:1000])
    code, _, err = run(capsys, tmp_path / "broken.pt", "--pairs", pairs)
    assert code == 2 and "broken.pt: cannot load it (it is truncated or not a PyTorch file)" in err
    assert len(err.strip().splitlines()) == 1
    saved = torch.load(ckpt, weights_only=True)
    saved["model_config"]["embedding_dim"] = 16  # as if model.py had changed since training
    torch.save(saved, tmp_path / "other.pt")
    code, _, err = run(capsys, tmp_path / "other.pt", "--pairs", pairs)
    assert code == 2 and "other.pt: its weights do not fit the network model.py builds" in err
    (tmp_path / "bad.txt").write_text("3\nA\t1\t2\n")
    code, _, err = run(capsys, ckpt, "--pairs", tmp_path / "bad.txt")
    assert code == 2 and "bad.txt" in err and "re-fetch" in err
    assert len(err.strip().splitlines()) == 1


def test_too_few_pairs_to_cut_into_folds_is_one_line_not_a_crash(tiny, tmp_path, capsys):
    """One same and one different pair fall in one fold, whose threshold would be chosen on
    no pairs at all: an error naming the file, not an IndexError from metrics."""
    root, ckpt = tiny
    pairs = write_pairs(tmp_path / "two.txt", [([("Test_Person_00", 1, 2)],
                                                [("Test_Person_00", 1, "Test_Person_01", 1)])])
    code, out, err = run(capsys, ckpt, "--pairs", pairs, "--out", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{pairs}: 2 pairs are too few to cut into folds" in err
    assert not (tmp_path / "o").exists()


def test_fold_needs_a_file_with_official_folds(tiny, capsys):
    root, ckpt = tiny
    code, _, err = run(capsys, ckpt, "--pairs", root / "pairsDevTest.txt", "--fold", 3)
    assert code == 2 and "has no official fold 3" in err


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
    assert evaluate.main(["--compare", str(tmp_path / "base"), str(tmp_path / "other")]) == 2
    assert "scored different pairs" in capsys.readouterr().err


# ---------------------------------------------------------------- pairs beyond LFW's files

def insightface_bin(path, bins, same):
    """A .bin as insightface's eval/verification.py loads it (pickle.load of (bins,
    issame_list)): bins[2i] and bins[2i + 1] the encoded images of pair i, written here
    without pairs.py."""
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in bins], [bool(s) for s in same]), f,
                    protocol=pickle.HIGHEST_PROTOCOL)
    return path


def kfold_ids(n, k=10):
    """Each pair's test fold under sklearn's KFold(k, shuffle=False), as insightface cuts."""
    ids = np.empty(n, dtype=int)
    for fold, (_, test) in enumerate(KFold(k, shuffle=False).split(np.arange(n))):
        ids[test] = fold
    return ids


def pairs_csv(path, rows, folds=None):
    lines = ["path_a,path_b,same" + (",fold" if folds is not None else "")]
    lines += [f"{a},{b},{int(s)}" + (f",{folds[i]}" if folds is not None else "")
              for i, (a, b, s) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def results(folder):
    return json.loads((folder / "results.json").read_text())


def test_a_bin_scores_as_the_same_pairs_given_as_csv(tiny, tmp_path, capsys):
    """The DevTest pairs as an insightface .bin (their JPEG bytes inside it) and as a CSV of
    the same files with insightface's folds: the same scores and the same figures."""
    root, ckpt = tiny
    lfw = ds.parse_pairs(root / "pairsDevTest.txt")
    rows = [(ds.image_path(root / "images", a, i), ds.image_path(root / "images", b, j), same)
            for a, i, b, j, same, _ in lfw]
    binary = insightface_bin(tmp_path / "devtest.bin", [p.read_bytes() for r in rows
                                                        for p in r[:2]], [r[2] for r in rows])
    table = pairs_csv(tmp_path / "devtest.csv", rows, kfold_ids(len(rows)))
    code, out, err = run(capsys, ckpt, "--pairs", binary, "--out", tmp_path / "bin")
    assert code == 0, err
    assert "the images of a .bin name no people, so contamination cannot be checked" in out
    assert run(capsys, ckpt, "--pairs", table, "--out", tmp_path / "csv")[0] == 0
    got, want = results(tmp_path / "bin"), results(tmp_path / "csv")
    assert csv_scores(tmp_path / "bin" / "scores.csv") == \
        pytest.approx(csv_scores(tmp_path / "csv" / "scores.csv"), rel=1e-5, abs=1e-6)
    assert got["kfold"]["fold_accuracies"] == want["kfold"]["fold_accuracies"]
    assert got["auc"] == pytest.approx(want["auc"]) and got["n_pairs"] == want["n_pairs"] == 40
    assert got["protocol"] == "10 consecutive folds (insightface's protocol)"
    assert want["protocol"] == "10 folds of the file"
    assert got["contaminated"] is None and got["people_in_pairs"] is None
    assert got["data"] == str(binary) and want["data_source"] == "the CSV's folder"
    with open(tmp_path / "bin" / "scores.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert (first["path_a"], first["path_b"], first["fold"]) == \
        ("devtest.bin#0", "devtest.bin#1", "0")
    # --identify has no names to enrol.
    code, _, err = run(capsys, ckpt, "--pairs", binary, "--identify", "--out", tmp_path / "i")
    assert code == 2 and "a .bin name no people" in err and len(err.strip().splitlines()) == 1


def test_a_csv_without_folds_gets_balanced_folds_and_identify_reads_its_people(tiny, tmp_path,
                                                                               capsys):
    """A CSV of the DevTest pairs (paths relative to --data, no fold column) gives exactly
    the LFW file's figures, for pairs and for --identify."""
    root, ckpt = tiny
    lfw = ds.parse_pairs(root / "pairsDevTest.txt")
    table = pairs_csv(tmp_path / "mine.csv", [(f"{a}/{a}_{i:04d}.jpg", f"{b}/{b}_{j:04d}.jpg", s)
                                              for a, i, b, j, s, _ in lfw])
    for pairs, name in ((table, "csv"), (root / "pairsDevTest.txt", "lfw")):
        for extra in ((), ("--identify",)):
            code, _, err = run(capsys, ckpt, "--pairs", pairs, "--data", root / "images",
                               "--out", tmp_path / (name + "".join(extra)), *extra)
            assert code == 0, err
    csv_r, lfw_r = results(tmp_path / "csv"), results(tmp_path / "lfw")
    assert csv_r["protocol"] == lfw_r["protocol"] == "10 class-balanced folds of one set"
    for key in ("kfold", "auc", "eer", "people_in_pairs", "contaminated"):
        assert csv_r[key] == lfw_r[key], key
    assert (tmp_path / "csv" / "scores.csv").read_text() == \
        (tmp_path / "lfw" / "scores.csv").read_text()
    csv_i, lfw_i = results(tmp_path / "csv--identify"), results(tmp_path / "lfw--identify")
    for key in ("rank1", "rank5", "cmc", "n_gallery", "n_mated_probes", "people_in_pairs"):
        assert csv_i[key] == lfw_i[key], key
    assert evaluate.main(["--compare", str(tmp_path / "lfw"), str(tmp_path / "csv")]) == 0
    assert "+0.00% accuracy" in capsys.readouterr().out


def test_a_random_split_run_scores_its_own_held_out_pairs(tmp_path, capsys, monkeypatch):
    """Any <person>/<image> folder: a --split=random run writes test_pairs.csv (paths
    relative to its data_dir), and `evaluate.py logs/<run>` finds and scores those pairs, no
    --pairs needed, from wherever it is run."""
    people = {f"Person_{k:02d}": 3 + k % 3 for k in range(24)}
    write_people(tmp_path / "photos", people)
    run_dir = tmp_path / "logs" / "mine"
    assert training.main(vars(trainer2), tiny_args(
        tmp_path, run_dir, data_dir=tmp_path / "photos", protocol_dir=tmp_path / "none",
        split="random", epochs=1, mixed_precision=False)) == 0
    own = run_dir / "test_pairs.csv"
    expected, _ = pr.read_pairs(own, image_dir=tmp_path / "photos")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run(capsys, run_dir)
    assert code == 0, err
    r = results(run_dir / "eval-test_pairs")
    assert r["pairs"] == str(own) and r["n_pairs"] == len(expected) > 0
    assert r["data"] == str(tmp_path / "photos") and r["data_source"] == "the checkpoint's data_dir"
    assert r["contaminated"] is False and r["people_seen_in_training"] == 0
    # Each pair scored as a lone pair of its two files would be.
    net, _ = m.load_checkpoint(run_dir / "best_accuracy.pt")
    naive = [pair_score(net, ds.load_image(p.path_a), ds.load_image(p.path_b))
             for p in expected]
    assert csv_scores(run_dir / "eval-test_pairs" / "scores.csv") == \
        pytest.approx(naive, rel=1e-5, abs=1e-6)


def lfw_slice(source, path, n=100):
    """A deterministic View 1 slice: every 5th matched and every 5th mismatched line of
    pairsDevTest.txt (n of each), in its own format."""
    lines = source.read_text().splitlines()
    total = int(lines[0])
    matched, mismatched = lines[1:1 + total], lines[1 + total:1 + 2 * total]
    step = total // n
    path.write_text("\n".join([str(n)] + matched[::step][:n] + mismatched[::step][:n]) + "\n")
    return path


def extract(archive, names, dest):
    """Only the named <person>/<image>.jpg members of an LFW archive, under dest."""
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            rel = Path(*Path(member.name).parts[1:]) if member.isfile() else None
            if rel in names:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())


@needs_lfw
@pytest.mark.skipif(not m.SHIPPED.is_file(), reason="no model is shipped in models/")
def test_view1_as_a_bin_gives_exactly_the_lfw_readers_accuracy(tmp_path, capsys):
    """Real faces: 200 DevTest pairs, their photos cropped as the shipped model's training
    crops were, scored as the LFW file and as a .bin of the same crops (ordered so that
    insightface's consecutive folds are the LFW reader's balanced folds): the same accuracy
    in every fold, the same AUC."""
    import crop_dataset_to_faces
    from inference import FaceModel
    lfw = Path(LFW_DIR)
    piece = lfw_slice(lfw / "pairsDevTest.txt", tmp_path / "slice.txt")
    pairs, _ = pr.read_pairs(piece, Path("."))
    names = {Path(p) for pair in pairs for p in pair[:2]}
    [archive] = sorted(lfw.glob("*.tgz"))[:1]
    extract(archive, names, tmp_path / "raw")
    c = FaceModel.load(m.SHIPPED).settings
    assert crop_dataset_to_faces.main([
        "--src", str(tmp_path / "raw"), "--dst", str(tmp_path / "crops"), "--size", str(c["size"]),
        "--mode", c["mode"], "--margin", str(c["margin"]), "--min-face", str(c["min_face"]),
        "--quality", str(c["jpeg_quality"])]) == 0
    capsys.readouterr()
    crops, _ = pr.read_pairs(piece, tmp_path / "crops")
    labels = np.array([p.same for p in crops])
    order = np.argsort(metrics.balanced_folds(labels), kind="stable")
    binary = insightface_bin(tmp_path / "slice.bin",
                             [Path(p).read_bytes() for k in order for p in crops[k][:2]],
                             labels[order])
    for pairs_file, out in ((piece, "lfw"), (binary, "bin")):
        code, _, err = run(capsys, m.SHIPPED, "--pairs", pairs_file, "--data", tmp_path / "crops",
                           "--out", tmp_path / out)
        assert code == 0, err
    got, want = results(tmp_path / "bin"), results(tmp_path / "lfw")
    assert want["n_pairs"] == got["n_pairs"] == 200 and want["pairs_skipped"] == 0
    assert got["kfold"]["fold_accuracies"] == want["kfold"]["fold_accuracies"]
    assert got["kfold"]["mean"] == want["kfold"]["mean"] > 0.9
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-9)


def test_a_fold_too_small_to_score_and_a_one_kind_file_are_one_line(tiny, tmp_path, capsys):
    """--fold K of a CSV whose fold holds one pair used to crash inside the metrics; a file
    of same pairs only was blamed on missing images that were not missing."""
    root, ckpt = tiny
    names = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    a, b = (sorted((root / "images" / n).glob("*.jpg")) for n in names[:2])
    rows = [f"{a[0]},{a[1]},1,0"] + [f"{a[0]},{a[1]},1,1", f"{a[0]},{b[0]},0,1"] * 3
    (tmp_path / "folds.csv").write_text("path_a,path_b,same,fold\n" + "\n".join(rows) + "\n")
    (tmp_path / "same.csv").write_text("path_a,path_b,same\n" + f"{a[0]},{a[1]},1\n" * 4)
    for name, extra, words in (("folds.csv", ["--fold", "0"], "fold 0 has 1 same and 0 different"),
                               ("same.csv", [], "all 4 pairs are same-person pairs")):
        code = evaluate.main([str(ckpt), "--pairs", str(tmp_path / name), "--out",
                              str(tmp_path / f"out-{name}"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and len(err.splitlines()) == 1, err


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    for i, obj in enumerate(([1, 2], torch.zeros(3), {"model": {}})):
        torch.save(obj, tmp_path / f"{i}.pt")
        with pytest.raises(m.CheckpointError, match="not a checkpoint written by training"):
            m.load_checkpoint(tmp_path / f"{i}.pt")


def test_identify_on_one_fold_of_a_csv(tiny, tmp_path, capsys):
    """--identify --fold K enrols that fold's people only."""
    root, ckpt = tiny
    lfw = ds.parse_pairs(root / "pairsDevTest.txt")
    rows = [(f"{a}/{a}_{i:04d}.jpg", f"{b}/{b}_{j:04d}.jpg", s) for a, i, b, j, s, _ in lfw]
    table = pairs_csv(tmp_path / "folds.csv", rows, folds=[k % 2 for k in range(len(rows))])
    code, _, err = run(capsys, ckpt, "--pairs", table, "--data", root / "images", "--identify",
                       "--fold", "1", "--out", tmp_path / "out")
    assert code == 0, err
    fold_people = {Path(p).parent.name for (a, b, _), k in zip(rows, range(len(rows)))
                   if k % 2 == 1 for p in (a, b)}
    assert results(tmp_path / "out")["people_in_pairs"] == len(fold_people)


# ---------------------------------------------------------------- every pair (--all-pairs)

def brute_force_pairs(net, images_by_person):
    """Every pair of the images, each scored on its own: (same scores, different scores)."""
    items = [(n, p) for n in sorted(images_by_person) for p in images_by_person[n]]
    crops = [ds.load_image(p) for _, p in items]
    same, diff = [], []
    for i, j in itertools.combinations(range(len(items)), 2):
        s = pair_score(net, crops[i], crops[j])
        (same if items[i][0] == items[j][0] else diff).append(s)
    return np.array(same), np.array(diff)


def test_training_stores_far_thresholds_that_brute_force_gives(tiny):
    root, ckpt = tiny
    net, saved = m.load_checkpoint(ckpt)
    people = ds.read_identities(root / "images")
    rec = saved["operating_points"]
    val = {n: people[n] for n in saved["val_people"]}
    same, diff = brute_force_pairs(net, val)
    assert (rec["n_same"], rec["n_different"]) == (len(same), len(diff))
    assert rec["n_images"] == sum(map(len, val.values())) and rec["n_people"] == len(val)
    top = np.sort(diff)[::-1]
    for key, point in rec["points"].items():
        assert point["threshold"] == pytest.approx(
            op.far_threshold(top, len(diff), float(key)), abs=1e-5)
        assert point["tar"] == pytest.approx(np.mean(same >= point["threshold"]))
    acc = rec["accuracy"]
    assert acc["threshold"] == saved["threshold"]
    assert acc["far"] == pytest.approx(np.mean(diff >= saved["threshold"]))


def test_all_pairs_matches_a_brute_force_computation(tiny, capsys):
    root, ckpt = tiny
    code, out, err = run(capsys, ckpt, "--pairs", root / "pairsDevTest.txt", "--all-pairs")
    assert code == 0, err
    folder = ckpt.parent / "eval-all-pairs-pairsDevTest"
    assert (folder / "roc.png").stat().st_size > 0
    r = json.loads((folder / "results.json").read_text())
    net, saved = m.load_checkpoint(ckpt)
    people = ds.read_identities(root / "images")
    names = ds.pair_people(ds.parse_pairs(root / "pairsDevTest.txt"))
    same, diff = brute_force_pairs(net, {n: people[n] for n in names})
    (s,) = r["sets"]
    assert (s["n_same"], s["n_different"], s["n_people"]) == (len(same), len(diff), len(names))
    assert s["n_images"] == r["images"] == sum(len(people[n]) for n in names)
    for key, point in saved["operating_points"]["points"].items():
        v = s["at_validation_thresholds"][key]  # judged at the validation threshold
        assert v["threshold"] == point["threshold"]
        assert v["tar"] == pytest.approx(np.mean(same >= point["threshold"]))
        assert v["far"] == pytest.approx(np.mean(diff >= point["threshold"]))
    top = np.sort(diff)[::-1]
    for key, v in s["at_test_thresholds"].items():  # BLUFR's: fitted on the test pairs
        t = op.far_threshold(top, len(diff), float(key))
        assert v["threshold"] == pytest.approx(t, abs=1e-5)
        assert v["tar"] == pytest.approx(np.mean(same >= t))
    assert f"{len(same):,} same-person and {len(diff):,} different-person pairs" in out


def test_all_pairs_of_view2_scores_each_fold_apart(tiny, tmp_path, capsys):
    root, ckpt = tiny
    names = sorted(TEST)
    folds = [([(a, 1, a, 2)], [(a, 1, b, 1)]) for a, b in zip(names[::2], names[1::2])]
    pairs = tmp_path / "pairs.txt"
    lines = [f"{len(folds)}\t1"]
    for (matched, mismatched) in folds:
        lines += [f"{a}\t{i}\t{j}" for a, i, _, j in matched]
        lines += [f"{a}\t{i}\t{b}\t{j}" for a, i, b, j in mismatched]
    pairs.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, ckpt, "--pairs", pairs, "--data", root / "images",
                         "--all-pairs", "--out", tmp_path / "out")
    assert code == 0, err
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [s["set"] for s in r["sets"]] == [f"fold {k}" for k in range(len(folds))]
    for s, (a, b) in zip(r["sets"], zip(names[::2], names[1::2])):
        n_a, n_b = TEST[a], TEST[b]  # each fold's two people, never paired across folds
        assert s["n_same"] == n_a * (n_a - 1) // 2 + n_b * (n_b - 1) // 2
        assert s["n_different"] == n_a * n_b
    assert "mean over 4 sets" in out
