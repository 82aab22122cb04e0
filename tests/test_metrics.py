import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import metrics


def lfw_view2_like(seed=0, n_folds=10, per_class=300):
    """Synthetic View 2 layout: each fold is 300 matched then 300 mismatched pairs."""
    rng = np.random.default_rng(seed)
    scores, labels, folds = [], [], []
    for k in range(n_folds):
        scores += [rng.normal(1, 1, per_class), rng.normal(-1, 1, per_class)]
        labels += [np.ones(per_class, int), np.zeros(per_class, int)]
        folds.append(np.full(2 * per_class, k))
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(folds)


def brute_force_threshold(scores, labels):
    """Try every candidate one by one; same tie rule as metrics.best_threshold."""
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1], (values[:-1] + values[1:]) / 2,
                                 [values[-1] + 1]])
    acc = np.array([np.mean((scores >= t) == (labels == 1)) for t in candidates])
    best = np.flatnonzero(acc == acc.max())
    last = best[0]
    while last + 1 < len(acc) and acc[last + 1] == acc.max():  # first run of ties
        last += 1
    return candidates[(best[0] + last) // 2], acc.max()


def test_kfold_matches_brute_force():
    scores, labels, folds = lfw_view2_like()
    result = metrics.kfold_accuracy(scores, labels, folds)
    expected = []
    for k in range(10):
        train, test = folds != k, folds == k
        t, train_acc = brute_force_threshold(scores[train], labels[train])
        assert result["thresholds"][k] == pytest.approx(t)
        assert np.mean((scores[train] >= t) == (labels[train] == 1)) == train_acc
        expected.append(np.mean((scores[test] >= t) == (labels[test] == 1)))
    assert result["fold_accuracies"] == pytest.approx(expected)
    assert result["mean"] == pytest.approx(np.mean(expected))
    assert result["std"] == pytest.approx(np.std(expected, ddof=1))
    assert result["stderr"] == pytest.approx(np.std(expected, ddof=1) / np.sqrt(10))
    assert result["threshold"] == pytest.approx(np.median(result["thresholds"]))
    # Planted signal N(1,1) vs N(-1,1): Bayes accuracy is Phi(1) ~ 0.841.
    assert 0.81 < result["mean"] < 0.87


def test_auc_matches_sklearn_and_mann_whitney():
    scores, labels, _ = lfw_view2_like(seed=1)
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    u = (diff > 0).sum() + 0.5 * (diff == 0).sum()
    auc = metrics.roc_auc(scores, labels)
    assert auc == pytest.approx(roc_auc_score(labels, scores))
    assert auc == pytest.approx(u / (len(pos) * len(neg)))


def test_tiny_hand_worked_example():
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    t = metrics.best_threshold(scores, labels)
    # Sorted: 0.1(-) 0.35(+) 0.4(-) 0.8(+); cuts at 0.225 and 0.6 both get 3/4; the first wins.
    assert t == pytest.approx(0.225)
    assert metrics.threshold_metrics(scores, labels, t)["accuracy"] == 0.75
    assert metrics.roc_auc(scores, labels) == 0.75


def test_perfect_separation():
    scores, labels = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), np.array([0, 0, 0, 1, 1, 1])
    t = metrics.best_threshold(scores, labels)
    assert t == pytest.approx(0.5)  # midpoint of the gap, not on a training score
    assert metrics.threshold_metrics(scores, labels, t)["accuracy"] == 1.0
    assert metrics.eer(scores, labels) == 0.0
    assert metrics.tar_at_far(scores, labels, 1e-3) == 1.0
    assert metrics.roc_auc(scores, labels) == 1.0


def test_bool_labels_and_constant_scores():
    # Both cuts (all "same" / all "different") score 1/2: the first is kept, never 0.5 itself.
    assert metrics.best_threshold([0.5, 0.5], [True, False]) == -0.5
    m = metrics.threshold_metrics([0.9, 0.1], [True, False], 0.5)
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_precision_recall_are_for_same_class():
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    labels = np.array([1, 0, 1, 0, 0])
    m = metrics.threshold_metrics(scores, labels, 0.5)
    # Predicted same: 0.9, 0.8, 0.7 -> TP=2, FP=1, FN=0. (Class 0 would give precision 1, recall 2/3.)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == 1.0
    assert m["f1"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["threshold"] == 0.5
    # No predicted positives: zero_division=0 rather than a warning/NaN.
    assert metrics.threshold_metrics(scores, labels, 2.0)["precision"] == 0.0


def test_tar_at_far_hand_case():
    neg = [0.1, 0.2, 0.3, 0.9]
    pos = [0.5, 0.6, 0.85, 0.95]
    scores, labels = np.array(neg + pos), np.array([0] * 4 + [1] * 4)
    # FAR 0: threshold above 0.9, only 0.95 is accepted.
    assert metrics.tar_at_far(scores, labels, 0.0) == 0.25
    assert metrics.tar_at_far(scores, labels, 0.1) == 0.25  # 1 false accept would be FAR 0.25
    # FAR 0.25 lets 0.9 through, so the threshold can drop to just above 0.3: all positives.
    assert metrics.tar_at_far(scores, labels, 0.25) == 1.0


def test_eer_symmetric_cases():
    # Exact tie between a positive and a negative: the ROC jumps from (0, .5) to (.5, 1);
    # FPR and FNR cross halfway along that segment.
    assert metrics.eer([5, 2, 2, 0], [1, 1, 0, 0]) == pytest.approx(0.25)
    # One error on each side: FAR = FRR = 1/4 at the same threshold.
    assert metrics.eer([0.6, 0.8, 0.9, 0.95, 0.05, 0.1, 0.2, 0.7],
                       [1, 1, 1, 1, 0, 0, 0, 0]) == pytest.approx(0.25)
    # Mirror-symmetric Gaussians N(+-1, 1): EER = Phi(-1) ~ 0.1587.
    scores, labels, _ = lfw_view2_like(seed=2)
    assert metrics.eer(scores, labels) == pytest.approx(0.1587, abs=0.02)


def test_kfold_never_fits_on_held_out_fold():
    scores, labels, folds = lfw_view2_like(seed=3)
    scores[folds == 0] += 5.0  # fold 0 lives elsewhere; fitting on it would move its threshold
    result = metrics.kfold_accuracy(scores, labels, folds)
    others = folds != 0
    assert result["thresholds"][0] == metrics.best_threshold(scores[others], labels[others])
    assert result["thresholds"][0] < 1.0  # far below where fold 0's own optimum (~5) would be
    # Everything in fold 0 scores above that threshold, so it is all predicted "same".
    assert result["fold_accuracies"][0] == 0.5


def test_balanced_folds():
    labels = np.array([1] * 500 + [0] * 500)
    folds = metrics.balanced_folds(labels)
    for k in range(10):
        assert np.sum((folds == k) & (labels == 1)) == 50
        assert np.sum((folds == k) & (labels == 0)) == 50
    assert np.all(np.diff(folds[:500]) >= 0)  # contiguous chunks in file order
    assert np.array_equal(folds, metrics.balanced_folds(labels))  # deterministic


def test_summary_is_complete_and_json_serialisable():
    scores, labels = np.r_[np.linspace(0, 1, 500) + 0.3, np.linspace(0, 1, 500)], \
        np.r_[np.ones(500, int), np.zeros(500, int)]
    s = metrics.summary(scores, labels)
    json.dumps(s, allow_nan=False)
    assert set(s) == {"n_pairs", "n_same", "n_diff", "auc", "eer", "tar@far=1e-2",
                      "tar@far=1e-3", "kfold", "at_threshold"}
    assert (s["n_pairs"], s["n_same"], s["n_diff"]) == (1000, 500, 500)
    assert set(s["kfold"]) == {"fold_accuracies", "thresholds", "mean", "std", "stderr",
                               "threshold"}
    assert len(s["kfold"]["fold_accuracies"]) == 10
    assert set(s["at_threshold"]) == {"accuracy", "precision", "recall", "f1", "threshold"}
    assert s["at_threshold"]["threshold"] == s["kfold"]["threshold"]
    assert metrics.summary(scores, labels, threshold=0.7)["at_threshold"]["threshold"] == 0.7


def test_ties_pick_middle_of_first_best_run():
    # Each of the values 1 and 2 holds one positive and one negative, so the cuts at 0.5, 1.5
    # and 2.5 all get 4/6 right; the middle one is returned.
    scores, labels = [0, 1, 1, 2, 2, 3], [0, 1, 0, 1, 0, 1]
    assert metrics.best_threshold(scores, labels) == 1.5


def test_out_of_fold_decisions_use_each_folds_own_threshold():
    # Fold 0's threshold (fit on fold 1) is 0.5, fold 1's (fit on fold 0) is 0.15: a pair
    # scoring 0.3 is "same" in fold 1 but "different" in fold 0.
    scores = np.array([0.6, 0.3, 0.1, 0.2, 0.3, 0.6])
    labels = np.array([1, 0, 0, 1, 1, 0])
    folds = np.array([0, 0, 0, 1, 1, 1])
    got = metrics.out_of_fold_metrics(scores, labels, folds, [0.5, 0.15])
    predicted = np.array([1, 0, 0, 1, 1, 1])
    assert got["accuracy"] == pytest.approx((predicted == labels).mean())
    assert got["precision"] == pytest.approx(3 / 4) and got["recall"] == pytest.approx(1.0)


def test_paired_bootstrap_interval_of_a_known_difference():
    """Model b gets 60 more of 1,000 pairs right than model a: +6 points, an interval around
    it that excludes 0; a model against itself: exactly 0."""
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 500)
    folds = metrics.balanced_folds(labels)
    a = np.where(labels == 1, 1.0, -1.0)
    wrong_a = rng.choice(1000, 100, replace=False)
    a[wrong_a] *= -1  # 100 wrong for a
    b = a.copy()
    b[wrong_a[:60]] *= -1  # b fixes 60 of them
    r = metrics.paired_bootstrap(a, b, labels, folds, n_boot=2000)
    assert r["difference"] == pytest.approx(0.06)
    assert 0.0 < r["low"] < 0.06 < r["high"] < 0.12
    same = metrics.paired_bootstrap(a, a, labels, folds, n_boot=200)
    assert same["difference"] == same["low"] == same["high"] == 0.0


OLD_HEADER = "name_a,number_a,name_b,number_b,same,fold,score"  # before pairs were paths
NEW_HEADER = "path_a,path_b,same,fold,score"


def scores_folder(folder, header, rows):
    folder.mkdir()
    (folder / "scores.csv").write_text("\n".join([header] + rows) + "\n")
    return folder


def test_read_scores_reads_path_pairs_and_the_old_lfw_tuples(tmp_path):
    """evaluate.py writes path_a,path_b,same,fold,score; a scores.csv from before (LFW's
    names and numbers) still reads, and the pair keys say which pairs were scored."""
    new = scores_folder(tmp_path / "new", NEW_HEADER,
                        ["A/A_0001.jpg,A/A_0002.jpg,1,0,0.9", "A/A_0001.jpg,B/B_0001.jpg,0,1,-0.5",
                         "x.bin#0,x.bin#1,1,2,0.25"])
    keys, labels, folds, scores = metrics.read_scores(new)
    assert keys == [("A/A_0001.jpg", "A/A_0002.jpg"), ("A/A_0001.jpg", "B/B_0001.jpg"),
                    ("x.bin#0", "x.bin#1")]
    assert labels.tolist() == [1, 0, 1] and folds.tolist() == [0, 1, 2]
    assert scores.tolist() == [0.9, -0.5, 0.25]
    old = scores_folder(tmp_path / "old", OLD_HEADER, ["A,1,A,2,1,0,0.9", "A,1,B,1,0,0,-0.5"])
    keys, labels, _, scores = metrics.read_scores(old)
    assert keys == [("A", "1", "A", "2"), ("A", "1", "B", "1")] and scores.tolist() == [0.9, -0.5]


def test_read_scores_names_a_missing_column_of_either_layout(tmp_path):
    for name, header in (("new", NEW_HEADER), ("old", OLD_HEADER)):
        short = ",".join(c for c in header.split(",") if c != "score")
        folder = scores_folder(tmp_path / name, short, [])
        with pytest.raises(metrics.ScoresError, match="no score column in its header"):
            metrics.read_scores(folder)
    folder = scores_folder(tmp_path / "neither", "a,b,same,fold,score", ["x,y,1,0,0.5"])
    with pytest.raises(metrics.ScoresError, match="no path_a, path_b column"):
        metrics.read_scores(folder)


def test_compare_scores_of_two_path_files(tmp_path):
    rows = [f"P{i}/1.jpg,P{i}/2.jpg,{int(i < 50)},{i % 10},{1.0 if i < 50 else -1.0}"
            for i in range(100)]
    a = scores_folder(tmp_path / "a", NEW_HEADER, rows)
    b = scores_folder(tmp_path / "b", NEW_HEADER, rows[:-1] + ["Q/1.jpg,Q/2.jpg,0,9,-1.0"])
    assert metrics.compare_scores(a, a, n_boot=100)["difference"] == 0.0
    with pytest.raises(metrics.ScoresError, match="scored different pairs"):
        metrics.compare_scores(a, b, n_boot=100)
