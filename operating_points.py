"""Thresholds chosen by false-accept rate, measured on every pair of a set of face images.

One accuracy-optimal threshold says nothing about how often a stranger is accepted. This
module scores every pair among N embedded images (N(N-1)/2 pairs, BLUFR's protocol, Liao et
al. 2014), keeps every same-person score and the highest KEEP share of the different-person
ones, and reads from them:
- the threshold at each false-accept rate (FAR): the cut that lets through at most
  floor(FAR x n_different) different-person pairs, and the true-accept rate (TAR) there;
- the ROC from FAR = 1 / n_different up to KEEP.

Exact, not approximate: every different-person score above the KEEP quantile is kept (a
running top-k, merged block by block), and a threshold at FAR <= KEEP depends only on those.
Memory is the same-person scores plus KEEP x n_different floats: 4.6 million for the 46
million different-person pairs of all 13,233 LFW images, never the 46 million.

The same numbers serve training (every checkpoint stores its validation people's operating
points), evaluate.py --all-pairs (the test people's, judged at the validation thresholds) and
verify.py, identify.py and the demo (--far: a threshold and what it means).
"""
import math

import numpy as np

from model import CheckpointError

FARS = (1e-2, 1e-3, 1e-4)   # the operating points every checkpoint records
KEEP = 0.1                  # share of the highest different-person scores kept
BLOCK = 512                 # query rows scored per matrix call


class NoOperatingPoints(CheckpointError):
    """A checkpoint without FAR thresholds; the message names the file and the fix."""


class BadRate(ValueError):
    """A --far that is not a rate; the message says what is."""


def far_key(far):
    return f"{far:g}"


def pair_counts(ids):
    """(same-person, different-person) pair counts among images with these person ids."""
    n = len(ids)
    counts = np.unique(np.asarray(ids), return_counts=True)[1].astype(np.int64)
    same = int((counts * (counts - 1) // 2).sum())
    return same, n * (n - 1) // 2 - same


def all_pairs(score_matrix, emb, ids, thresholds=(), keep=KEEP, block=BLOCK):
    """Every unordered pair i < j of the images. score_matrix(queries, gallery_rows) -> (M, K)
    scores, gallery_rows being emb's rows from i on (FaceModel/SiameseNet.score_matrix on a
    prepare_gallery() matrix). Returns same (every same-person score), top (the highest
    ceil(keep x n_different) different-person scores, descending), n_same, n_different, and
    above: for each of the given thresholds, how many different-person pairs score >= it
    (counted exactly, whether or not it falls inside top)."""
    ids = np.asarray(ids)
    n_same, n_diff = pair_counts(ids)
    k = min(n_diff, math.ceil(keep * n_diff) + 1)
    same, top, above = [], np.empty(0), np.zeros(len(thresholds), dtype=np.int64)
    for r0 in range(0, len(ids), block):
        s = score_matrix(r0, min(r0 + block, len(ids))).numpy().astype(np.float64)
        rows, cols = np.arange(r0, r0 + len(s))[:, None], np.arange(r0, len(ids))[None, :]
        upper = cols > rows
        match = ids[rows] == ids[cols]
        same.append(s[upper & match])
        neg = s[upper & ~match]
        above += [(neg >= t).sum() for t in thresholds]
        top = np.concatenate([top, neg])
        if len(top) > k:
            top = np.partition(top, len(top) - k)[len(top) - k:]
    return {"same": np.concatenate(same) if same else np.empty(0), "top": np.sort(top)[::-1],
            "n_same": n_same, "n_different": n_diff,
            "above": {t: int(a) for t, a in zip(thresholds, above)}}


def embedding_pairs(score_fn, prepared, emb, ids, thresholds=(), keep=KEEP):
    """all_pairs of embeddings: score_fn(queries, gallery) scores queries against rows of a
    prepare_gallery() matrix (FaceModel.score_matrix or SiameseNet.score_matrix)."""
    return all_pairs(lambda a, b: score_fn(emb[a:b], prepared[a:]), emb, ids, thresholds, keep)


def far_threshold(top, n_diff, far):
    """The threshold that accepts at most floor(far x n_diff) of the different-person pairs
    whose highest scores are `top` (descending): halfway between the last one allowed through
    and the first one kept out, so that the cut never sits on a fitted score. None when
    there are too few pairs to cut (far x n_diff < 1 still cuts: above the highest)."""
    allowed = int(math.floor(far * n_diff + 1e-9))
    if n_diff == 0 or allowed >= len(top):
        return None
    first_out = top[allowed]
    if allowed and top[allowed - 1] > first_out:
        return float((top[allowed - 1] + first_out) / 2)
    return float(np.nextafter(first_out, np.inf))  # ties: none of them is let through


def tar(same, threshold):
    same = np.asarray(same)
    return float(np.mean(same >= threshold)) if len(same) else None


def fit(pairs, fars=FARS):
    """{far: {threshold, tar, false_accepts, allowed}} of all_pairs()'s output."""
    points = {}
    for far in fars:
        t = far_threshold(pairs["top"], pairs["n_different"], far)
        if t is None:
            continue
        points[far_key(far)] = {
            "far": far, "threshold": t, "tar": tar(pairs["same"], t),
            "false_accepts": int((pairs["top"] >= t).sum()),
            "allowed": int(math.floor(far * pairs["n_different"] + 1e-9))}
    return points


def at(pairs, threshold):
    """{threshold, far, tar} measured at a threshold all_pairs counted (in its thresholds)."""
    n = pairs["n_different"]
    return {"threshold": float(threshold), "tar": tar(pairs["same"], threshold),
            "far": pairs["above"][threshold] / n if n else None,
            "false_accepts": pairs["above"][threshold]}


def record(pairs, n_images, n_people, accuracy_threshold=None, fars=FARS):
    """What a checkpoint stores: the operating points, what they rest on and, when given,
    the FAR and TAR of the accuracy-optimal threshold (counted in all_pairs' thresholds)."""
    out = {"points": fit(pairs, fars), "n_same": pairs["n_same"],
           "n_different": pairs["n_different"], "n_images": int(n_images),
           "n_people": int(n_people),
           "on": f"every pair of the {n_images} images of {n_people} validation people"}
    if accuracy_threshold is not None:
        out["accuracy"] = at(pairs, accuracy_threshold)
    return out


def roc(pairs, lowest=1e-4):
    """(far, tar) arrays of the ROC from max(lowest, 1 / n_different) to KEEP: each kept
    different-person score as a threshold, exact where the kept scores reach."""
    top, n_diff = pairs["top"], pairs["n_different"]
    if not len(top) or not len(pairs["same"]):
        return np.empty(0), np.empty(0)
    far = np.arange(1, len(top) + 1) / n_diff
    same = np.sort(pairs["same"])
    tars = 1 - np.searchsorted(same, top, side="left") / len(same)
    keep = far >= min(lowest, far[-1])
    return far[keep], tars[keep]


def judged(pairs, ops, fars=FARS):
    """The figures of one test set's all_pairs (counted at the thresholds of ops, the
    checkpoint's operating points, or None): at each stored threshold, fitted on the
    validation people, the test's TAR and the FAR it really gives there; and, as BLUFR reports
    it, the TAR at thresholds fitted on the test's own different-person pairs."""
    report = {"n_same": pairs["n_same"], "n_different": pairs["n_different"],
              "at_validation_thresholds": {}, "at_test_thresholds": fit(pairs, fars)}
    for key, point in ((ops or {}).get("points") or {}).items():
        report["at_validation_thresholds"][key] = {**at(pairs, point["threshold"]),
                                                   "target_far": point["far"]}
    if (ops or {}).get("accuracy"):
        report["at_accuracy_threshold"] = at(pairs, ops["accuracy"]["threshold"])
    return report


def thresholds_of(ops):
    """The thresholds all_pairs must count for judged(): the stored ones."""
    ops = ops or {}
    points = [p["threshold"] for p in (ops.get("points") or {}).values()]
    return tuple(points + ([ops["accuracy"]["threshold"]] if ops.get("accuracy") else []))


def across(reports):
    """Mean and sample std over sets (View 2's folds) of each TAR in judged()'s reports."""
    out = {}
    for kind in ("at_validation_thresholds", "at_test_thresholds"):
        for key in reports[0][kind]:
            values = [r[kind][key]["tar"] for r in reports if key in r[kind]]
            out[f"{kind}/{key}"] = {"mean": float(np.mean(values)), "n_sets": len(values),
                                    "std": float(np.std(values, ddof=1)) if len(values) > 1
                                    else 0.0}
    return out


# ---------------------------------------------------------------- checkpoints and users

def stored(ckpt, path):
    """A checkpoint's operating points, or NoOperatingPoints naming the fix."""
    op = ckpt.get("operating_points") if isinstance(ckpt, dict) else None
    if not op or not op.get("points"):
        raise NoOperatingPoints(
            f"{path}: has no false-accept thresholds (it was saved before they were recorded); "
            f"add them with `python calibrate.py {path}`, or pass --threshold")
    return op


def choose(op, far, path):
    """The stored point for a FAR (1e-3, 0.001, ...), or NoOperatingPoints naming the ones
    there are."""
    point = op["points"].get(far_key(float(far)))
    if point is None:
        have = ", ".join(op["points"])
        raise NoOperatingPoints(f"{path}: has no threshold for FAR {far:g}; it has {have} "
                                "(or pass --threshold)")
    return point


def one_in(far):
    return f"1 in {round(1 / far):,}" if far else "none"


def sentence(point, op):
    """What a threshold means, in words a user can act on."""
    return (f"on {op['n_people']} validation people ({op['n_different']:,} different-person "
            f"pairs), about {one_in(point['far'])} different-person pairs score at or above "
            f"{point['threshold']:.4f}; {point['tar']:.0%} of same-person pairs "
            f"({op['n_same']:,}) do")


def check_far(far):
    """far as a float, or BadRate when it is not a rate (0 < far < 1)."""
    far = float(far)
    if not 0 < far < 1:  # NaN too
        raise BadRate(f"--far {far:g}: a false-accept rate is between 0 and 1, such as "
                         f"{', '.join(far_key(f) for f in FARS)}")
    return far
