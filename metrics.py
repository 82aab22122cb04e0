"""Face-verification metrics and the 10-fold LFW protocol.

Conventions used by every function:
- ``scores``: 1-D floats, HIGHER = more likely the same person (callers negate distances).
- ``labels``: 1-D int/bool, 1 = same person (the "positive" class), 0 = different.
- The decision rule is ``score >= threshold`` => same.
All returned values are plain Python floats/ints/lists so reports can be dumped to JSON.
"""
import csv
from pathlib import Path

import numpy as np
from sklearn.metrics import (accuracy_score, precision_recall_fscore_support, roc_auc_score,
                             roc_curve)


def _as_arrays(scores, labels):
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(np.int64)  # bool -> 0/1 so pos_label=1 works
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    return scores, labels


def best_threshold(scores, labels):
    """Threshold maximising the accuracy of ``score >= t`` on these pairs.

    Candidates are the midpoints between consecutive distinct scores plus one value below the
    minimum and one above the maximum, so a threshold never sits on a training score and the
    rule is unambiguous on unseen data. Ties: among equally accurate candidates, take the first
    (lowest) run of consecutive ones and return its middle candidate (the lower of the two
    middles for an even run), so the cut keeps a margin from the scores on both sides.
    O(n log n): one sort, then cumulative sums.
    """
    scores, labels = _as_arrays(scores, labels)
    values, inverse = np.unique(scores, return_inverse=True)  # sorted distinct scores
    pos = np.bincount(inverse, weights=labels, minlength=len(values))
    neg = np.bincount(inverse, weights=1 - labels, minlength=len(values))
    # Candidate j predicts "same" for values[j:], so it gets right the positives at or above
    # values[j] and the negatives below; j = len(values) means "everything different".
    pos_below = np.concatenate([[0.0], np.cumsum(pos)])
    neg_below = np.concatenate([[0.0], np.cumsum(neg)])
    correct = (pos.sum() - pos_below) + neg_below
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2,
                                 [values[-1] + 1.0]])
    best = np.flatnonzero(correct == correct.max())
    # End of the first run of consecutive best indices.
    gaps = np.flatnonzero(np.diff(best) > 1)
    last = best[gaps[0]] if len(gaps) else best[-1]
    return float(candidates[(best[0] + last) // 2])


def threshold_metrics(scores, labels, threshold):
    """Accuracy and precision/recall/F1 of the "same" class (label 1) at a fixed threshold."""
    scores, labels = _as_arrays(scores, labels)
    predicted = (scores >= threshold).astype(np.int64)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, average="binary", pos_label=1, zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predicted)), "precision": float(precision),
            "recall": float(recall), "f1": float(f1), "threshold": float(threshold)}


def roc_auc(scores, labels):
    scores, labels = _as_arrays(scores, labels)
    return float(roc_auc_score(labels, scores))


def eer(scores, labels):
    """Equal error rate: where the false-accept rate equals the false-reject rate.

    The ROC is piecewise linear between sklearn's points, so we interpolate linearly on the
    segment where FNR - FPR changes sign.
    """
    scores, labels = _as_arrays(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    gap = (1 - tpr) - fpr  # starts at 1 (threshold +inf), ends at -1; never increases
    i = int(np.argmax(gap <= 0))
    if gap[i] == 0:
        return float(fpr[i])
    s = gap[i - 1] / (gap[i - 1] - gap[i])  # fraction of the way along segment i-1 -> i
    return float(fpr[i - 1] + s * (fpr[i] - fpr[i - 1]))


def tar_at_far(scores, labels, far):
    """True-accept rate at the operating point with the highest TAR whose FAR <= ``far``.

    That is the lowest ROC threshold that still keeps FAR within the target. Conservative: no
    interpolation towards the target, so the FAR actually achieved may be below ``far``. FAR is
    counted in whole negatives: with 3,000 different-person pairs, far=1e-3 allows at most 3
    false accepts, and far below 1/n_negatives allows none.
    """
    scores, labels = _as_arrays(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    # fpr is non-decreasing and starts at 0, so this index is always valid.
    return float(tpr[np.searchsorted(fpr, far, side="right") - 1])


def kfold_accuracy(scores, labels, folds):
    """LFW protocol: for each fold, fit the threshold on the other folds and test on it.

    ``std`` uses ddof=1 and ``stderr`` = std / sqrt(n_folds), the "mean ± standard error" the
    LFW results page reports. ``threshold`` is the median of the per-fold thresholds: one
    value to deploy, and the median is not dragged by one odd fold.
    """
    scores, labels = _as_arrays(scores, labels)
    folds = np.asarray(folds).ravel()
    if folds.shape != scores.shape:
        raise ValueError("folds must give one fold id per pair")
    accuracies, thresholds = [], []
    for k in np.unique(folds):
        test = folds == k
        t = best_threshold(scores[~test], labels[~test])  # never sees fold k
        thresholds.append(t)
        accuracies.append(float(np.mean((scores[test] >= t) == (labels[test] == 1))))
    n = len(accuracies)
    std = float(np.std(accuracies, ddof=1)) if n > 1 else 0.0
    return {"fold_accuracies": accuracies, "thresholds": thresholds,
            "mean": float(np.mean(accuracies)), "std": std, "stderr": float(std / np.sqrt(n)),
            "threshold": float(np.median(thresholds))}


def balanced_folds(labels, n_folds=10):
    """Fold ids for a single-set pairs file so every fold has the same class mix.

    Pair i goes to fold (its rank within its class) * n_folds // class size, so each class is
    cut into n_folds contiguous chunks in file order. Deterministic: no shuffling.
    """
    labels = np.asarray(labels).ravel().astype(np.int64)
    folds = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        folds[idx] = np.arange(len(idx)) * n_folds // len(idx)
    return folds


def out_of_fold_decisions(scores, folds, thresholds):
    """Each pair's "same" decision at the threshold fitted without its fold."""
    folds = np.asarray(folds).ravel()
    cut = np.array([thresholds[k] for k in np.searchsorted(np.unique(folds), folds)])
    return (np.asarray(scores) >= cut).astype(np.int64)


def out_of_fold_metrics(scores, labels, folds, thresholds):
    """Accuracy and "same"-class precision/recall/F1 of the pooled out-of-fold decisions: each
    pair judged at the threshold fitted without its fold, so no pair helps choose its own."""
    scores, labels = _as_arrays(scores, labels)
    predicted = out_of_fold_decisions(scores, folds, thresholds)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, average="binary", pos_label=1, zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predicted)), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}


def paired_bootstrap(scores_a, scores_b, labels, folds, n_boot=10000, seed=0):
    """Accuracy of model b minus model a on the same pairs, each pair judged out of fold as
    the k-fold accuracy judges it, with a 95% percentile bootstrap interval: the pairs are
    resampled with replacement, one draw for both models, so their shared hard pairs cancel.
    An interval that straddles 0 is no evidence of a difference."""
    labels = np.asarray(labels).ravel()
    right = []
    for scores in (scores_a, scores_b):
        scores, _ = _as_arrays(scores, labels)
        thresholds = kfold_accuracy(scores, labels, folds)["thresholds"]
        right.append(out_of_fold_decisions(scores, folds, thresholds) == labels)
    a, b = (r.astype(np.float64) for r in right)
    rng = np.random.default_rng(seed)
    diffs = np.concatenate([(b[i] - a[i]).mean(1) for i in np.array_split(
        rng.integers(0, len(a), size=(n_boot, len(a))), 10)])
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {"difference": float(b.mean() - a.mean()), "low": float(low), "high": float(high),
            "n_pairs": int(len(a)), "n_boot": int(n_boot)}


class ScoresError(ValueError):
    """A scores.csv that cannot be read or compared; the message names the file and the fix."""


SCORE_COLUMNS = ("path_a", "path_b", "same", "fold", "score")
# What identifies a pair: its two image paths, or in a scores.csv written before pairs were
# paths (LFW's tuples only), its two names and numbers; either is read.
PAIR_KEYS = (("path_a", "path_b"), ("name_a", "number_a", "name_b", "number_b"))
REWRITE = "re-run evaluate.py to write it again"


def _number(text, kind):
    try:
        return kind(text)
    except ValueError:
        return None


def _score_row(row, path, line, width, key):
    """(key, label, fold, score) of one scores.csv row (a csv.DictReader dict), or
    ScoresError naming the line. width: the header's number of fields; key: its PAIR_KEYS."""
    where = f"{path}, line {line}"
    if None in row or None in row.values():  # DictReader's marks of a long and a short row
        n = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, ()))
        raise ScoresError(f"{where}: {n} fields where its header has {width}; {REWRITE}")
    same, fold, score = (_number(row[c], kind) for c, kind in
                         (("same", int), ("fold", int), ("score", float)))
    if same not in (0, 1) or fold is None:
        raise ScoresError(f"{where}: same {row['same']!r} and fold {row['fold']!r} must be 0 or "
                          f"1 and a whole number; {REWRITE}")
    if score is None or not np.isfinite(score):  # NaN would pass every comparison silently
        raise ScoresError(f"{where}: the score {row['score']!r} is not a finite number; "
                          f"{REWRITE}")
    return tuple(row[c] for c in key), same, fold, score


def _pair_key(path, fieldnames):
    """The PAIR_KEYS columns of a scores.csv header, or ScoresError naming what is missing."""
    fields = fieldnames or ()
    key = next((k for k in PAIR_KEYS if all(c in fields for c in k)), PAIR_KEYS[0])
    missing = [c for c in key + SCORE_COLUMNS[2:] if c not in fields]
    if missing:
        raise ScoresError(f"{path}, line 1: no {', '.join(missing)} column in its header; "
                          f"{REWRITE}")
    return key


def read_scores(folder):
    """(pair keys, labels, folds, scores) of the scores.csv that evaluate.py wrote in FOLDER
    (path_a,path_b,same,fold,score; or, from before, LFW's name_a,number_a,name_b,number_b in
    place of the paths). ScoresError, naming the file and the line, for a file that is
    missing, lacks a column, holds a short or long row, a score that is not a finite number
    (NaN, text), or no pair."""
    path = Path(folder) / "scores.csv"
    if not path.is_file():
        raise ScoresError(f"{path}: missing; pass a folder that evaluate.py wrote")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            key = _pair_key(path, reader.fieldnames)
            rows = [_score_row(row, path, reader.line_num, len(reader.fieldnames), key)
                    for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ScoresError(f"{path}: cannot read it ({e}); {REWRITE}") from None
    if not rows:
        raise ScoresError(f"{path}: no pairs in it, only a header; {REWRITE}")
    keys, labels, folds, scores = zip(*rows)
    return list(keys), np.array(labels), np.array(folds), np.array(scores, dtype=np.float64)


def compare_scores(base, new, **bootstrap):
    """paired_bootstrap of two evaluation folders of the same pairs: NEW's accuracy minus
    BASE's. A single-fold pairs file (DevTest) gets balanced folds for the thresholds."""
    (keys_a, labels, folds, a), (keys_b, labels_b, _, b) = read_scores(base), read_scores(new)
    if keys_a != keys_b or not np.array_equal(labels, labels_b):
        raise ScoresError(f"{base} and {new} scored different pairs; compare evaluations of the "
                          "same pairs file")
    if len(np.unique(labels)) < 2:
        raise ScoresError(f"{Path(base) / 'scores.csv'}: its pairs are all "
                          f"{'same' if labels[0] else 'different'}; an accuracy difference "
                          "needs both same and different pairs")
    if len(np.unique(folds)) < 2:
        folds = balanced_folds(labels)
    return paired_bootstrap(a, b, labels, folds, **bootstrap)


def summary(scores, labels, folds=None, threshold=None):
    """Everything a report needs, as JSON-serialisable Python values.

    ``at_threshold`` is evaluated at ``threshold`` if given; else it holds the out-of-fold
    decisions (each fold at its own threshold) and, as ``threshold``, the folds' median.
    """
    scores, labels = _as_arrays(scores, labels)
    if folds is None:
        folds = balanced_folds(labels)
    kfold = kfold_accuracy(scores, labels, folds)
    if threshold is None:
        at = {**out_of_fold_metrics(scores, labels, folds, kfold["thresholds"]),
              "threshold": kfold["threshold"]}
    else:
        at = threshold_metrics(scores, labels, threshold)
    n_same = int(labels.sum())
    return {"n_pairs": int(len(labels)), "n_same": n_same, "n_diff": int(len(labels) - n_same),
            "auc": roc_auc(scores, labels), "eer": eer(scores, labels),
            "tar@far=1e-2": tar_at_far(scores, labels, 1e-2),
            "tar@far=1e-3": tar_at_far(scores, labels, 1e-3),
            "kfold": kfold, "at_threshold": at}


# ---------------------------------------------------------------- identification (1:N)
#
# Conventions: ``scores`` is a (n_probes, n_gallery) matrix, HIGHER = more likely the same
# person; ``gallery_labels`` names the person of each gallery column (a person may have
# several columns) and ``probe_labels`` the person of each probe row. A probe is *mated* when
# its person is in the gallery, *non-mated* otherwise. A gallery person's score for a probe is
# the best of their columns (the rule identify.py uses; BLUFR scores a person the same way),
# and ranks count people, not photos.

def best_per_person(scores, gallery_labels):
    """(person_scores (n_probes, n_people), people): each probe's best score over each gallery
    person's columns, people sorted."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    labels = np.asarray(gallery_labels).ravel()
    if scores.shape[1] != len(labels):
        raise ValueError(f"scores have {scores.shape[1]} gallery columns but gallery_labels "
                         f"has {len(labels)} labels")
    people, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(people)))
    return np.maximum.reduceat(scores[:, order], starts, axis=1), people


def identification_ranks(scores, probe_labels, gallery_labels):
    """(ranks, mated): the rank (1 = best) of each mated probe's true person among the gallery
    people, and the mated mask over all probes. Ties count against the probe: a person who
    scores as high as the true one ranks above it, so a constant scorer gets the last rank
    rather than the first."""
    person, people = best_per_person(scores, gallery_labels)
    probe_labels = np.asarray(probe_labels).ravel()
    if len(probe_labels) != len(person):
        raise ValueError(f"{len(person)} probe rows but {len(probe_labels)} probe labels")
    mated = np.isin(probe_labels, people)
    rows = person[mated]
    true = rows[np.arange(len(rows)), np.searchsorted(people, probe_labels[mated])]
    return (rows >= true[:, None]).sum(1), mated


def cmc(ranks, max_rank=20):
    """Cumulative match characteristic: the share of mated probes whose true person is within
    the top r, for r = 1..max_rank (closed-set identification rate at rank r)."""
    ranks = np.asarray(ranks).ravel()
    if not len(ranks):
        return [None] * max_rank
    return [float(np.mean(ranks <= r)) for r in range(1, max_rank + 1)]


def open_set_threshold(nonmated_best, far):
    """The score threshold at which a share ``far`` of the non-mated probes raise a false
    alarm (best score >= threshold), as BLUFR's OpenSetROC sets it (Liao et al. 2014): with
    k = round(far * n) false alarms allowed (halves rounded up), the k-th highest non-mated
    best score; with k = 0, just above the highest, so that none is accepted."""
    best = np.sort(np.asarray(nonmated_best, dtype=np.float64).ravel())[::-1]
    if not len(best):
        raise ValueError("no non-mated probes: the open-set threshold needs some")
    k = int(np.floor(far * len(best) + 0.5))  # MATLAB's round: halves away from zero
    return float(np.nextafter(best[0], np.inf)) if k == 0 else float(best[min(k, len(best)) - 1])


def dir_at_far(scores, probe_labels, gallery_labels, far):
    """Open-set detection and identification rate at a false-alarm rate (BLUFR, rank 1): the
    share of mated probes whose true person ranks first and whose score reaches the threshold
    that open_set_threshold sets on the non-mated probes' best scores. Returns (DIR,
    threshold)."""
    person, _ = best_per_person(scores, gallery_labels)
    ranks, mated = identification_ranks(scores, probe_labels, gallery_labels)
    threshold = open_set_threshold(person[~mated].max(1), far)
    top = person[mated].max(1)  # the true person's score when it ranks first
    return float(np.mean((ranks == 1) & (top >= threshold))) if mated.any() else None, threshold


def open_set_at(scores, probe_labels, gallery_labels, threshold):
    """(DIR, false-alarm rate) at a given threshold, such as one fitted on validation people:
    the share of mated probes whose true person ranks first with a score >= threshold, and
    the share of non-mated probes whose best score reaches it (None where there are none)."""
    person, _ = best_per_person(scores, gallery_labels)
    ranks, mated = identification_ranks(scores, probe_labels, gallery_labels)
    best = person.max(1)
    hit = float(np.mean((ranks == 1) & (best[mated] >= threshold))) if mated.any() else None
    alarm = float(np.mean(best[~mated] >= threshold)) if (~mated).any() else None
    return hit, alarm


def identification_summary(scores, probe_labels, gallery_labels, fars=(0.01, 0.1), max_rank=20):
    """Closed-set rank-1 and rank-5 identification rates and the CMC over the mated probes,
    and the open-set DIR at each false-alarm rate (None without non-mated probes), as
    JSON-serialisable values."""
    ranks, mated = identification_ranks(scores, probe_labels, gallery_labels)
    curve = cmc(ranks, max_rank)
    report = {"rank1": curve[0], "rank5": curve[min(5, max_rank) - 1], "cmc": curve,
              "n_gallery": int(len(np.unique(np.asarray(gallery_labels)))),
              "n_gallery_photos": int(len(np.asarray(gallery_labels).ravel())),
              "n_mated_probes": int(mated.sum()), "n_nonmated_probes": int((~mated).sum()),
              "open_set_thresholds": {}}
    for far in fars:
        key = f"dir@far={far:g}"
        if mated.any() and (~mated).any():
            report[key], report["open_set_thresholds"][key] = dir_at_far(
                scores, probe_labels, gallery_labels, far)
        else:
            report[key] = None
    return report
