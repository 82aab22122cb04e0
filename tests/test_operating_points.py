"""Thresholds chosen by false-accept rate: known exactly on synthetic scores, the streaming
all-pairs scorer against brute force, and what a checkpoint without them says."""
import itertools

import numpy as np
import pytest
import torch

import operating_points as op


def pairs_of(same, neg):
    neg = np.asarray(neg, dtype=np.float64)
    return {"same": np.asarray(same, dtype=np.float64), "top": np.sort(neg)[::-1],
            "n_same": len(same), "n_different": len(neg), "above": {}}


def test_thresholds_are_known_exactly_on_evenly_spaced_negatives():
    # 10,000 different-person scores 0.0000 .. 0.9999: FAR 1e-2 lets the 100 highest through.
    neg = np.arange(10_000) / 10_000
    same = np.linspace(0.5, 1.0, 1001)
    points = op.fit(pairs_of(same, neg))
    assert points["0.01"]["threshold"] == pytest.approx(0.98995)
    assert points["0.001"]["threshold"] == pytest.approx(0.99895)
    assert points["0.0001"]["threshold"] == pytest.approx(0.99985)
    for key, allowed in (("0.01", 100), ("0.001", 10), ("0.0001", 1)):
        t = points[key]["threshold"]
        assert points[key]["false_accepts"] == allowed == int((neg >= t).sum())
        assert points[key]["tar"] == pytest.approx(np.mean(same >= t))


def test_a_rate_below_one_pair_cuts_above_the_highest_and_ties_let_none_through():
    neg = [0.1, 0.5, 0.5, 0.5, 0.2]
    t = op.far_threshold(np.sort(neg)[::-1], 5, 1e-3)  # 0.005 pairs allowed: none
    assert t > 0.5 and np.nextafter(0.5, 1) == t
    t = op.far_threshold(np.sort(neg)[::-1], 5, 0.4)   # two allowed, but three tie at 0.5
    assert sum(n >= t for n in neg) == 0
    assert op.far_threshold(np.empty(0), 0, 1e-2) is None


def brute_force(emb, ids, score):
    same, neg = [], []
    for i, j in itertools.combinations(range(len(ids)), 2):
        (same if ids[i] == ids[j] else neg).append(score(emb[i], emb[j]))
    return np.sort(same), np.sort(neg)[::-1]


@pytest.mark.parametrize("block", [1, 7, 512])
def test_all_pairs_matches_brute_force(block):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(60, 8, generator=g)
    ids = np.repeat(np.arange(20), 3)[torch.randperm(60, generator=g).numpy()]
    cos = lambda q, gal: torch.nn.functional.normalize(q, dim=1) @ gal.T  # noqa: E731
    gallery = torch.nn.functional.normalize(emb, dim=1)
    got = op.all_pairs(lambda a, b: cos(emb[a:b], gallery[a:]), emb, ids,
                       thresholds=(0.3,), keep=0.25, block=block)
    same, neg = brute_force(emb.double(), ids,
                            lambda a, b: float(torch.cosine_similarity(a, b, dim=0)))
    assert (got["n_same"], got["n_different"]) == (len(same), len(neg)) == (60, 1710)
    np.testing.assert_allclose(np.sort(got["same"]), same, atol=1e-6)
    k = int(np.ceil(0.25 * len(neg))) + 1
    np.testing.assert_allclose(got["top"], neg[:k], atol=1e-6)
    assert got["above"][0.3] == int((neg >= 0.3).sum())
    # Every threshold at FAR <= keep is the one all the negatives give.
    full = pairs_of(same, neg)
    for far in (0.2, 0.05, 0.01):
        assert op.far_threshold(got["top"], 1710, far) == \
            pytest.approx(op.far_threshold(full["top"], 1710, far), abs=1e-6)


def test_roc_is_exact_where_the_kept_scores_reach():
    neg = np.arange(1000) / 1000
    same = np.array([0.9995, 0.995, 0.95, 0.5])
    kept = {**pairs_of(same, neg), "top": np.sort(neg)[::-1][:101]}  # the top 10% and one
    far, tar = op.roc(kept, lowest=1e-3)
    assert far[0] == pytest.approx(1e-3) and far[-1] == pytest.approx(0.101)
    # At FAR 1/1000 the threshold is the highest negative, 0.999: one same pair reaches it.
    assert tar[0] == pytest.approx(0.25)
    assert tar[np.searchsorted(far, 0.01)] == pytest.approx(0.5)


def test_a_checkpoint_without_them_names_the_fix():
    with pytest.raises(op.NoOperatingPoints, match=r"old\.pt: has no false-accept thresholds.*"
                       r"python calibrate\.py old\.pt.*--threshold"):
        op.stored({"threshold": 0.1}, "old.pt")
    ops = {"points": {"0.001": {"far": 1e-3, "threshold": 0.5, "tar": 0.6}}, "n_people": 4,
           "n_same": 10, "n_different": 2000}
    with pytest.raises(op.NoOperatingPoints, match="no threshold for FAR 0.05; it has 0.001"):
        op.choose(ops, 0.05, "x.pt")
    assert op.choose(ops, 0.001, "x.pt")["threshold"] == 0.5
    assert op.sentence(op.choose(ops, 1e-3, "x.pt"), ops) == (
        "on 4 validation people (2,000 different-person pairs), about 1 in 1,000 "
        "different-person pairs score at or above 0.5000; 60% of same-person pairs (10) do")
    with pytest.raises(ValueError, match="between 0 and 1"):
        op.check_far(2)
