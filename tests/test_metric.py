"""The learned metric (metric_learning.py, fit_metric.py): whitening and WCCN recover identity
from embeddings whose largest spread is within-person, and a fitted checkpoint scores through
every entry point with its map, validated only on people it was not fitted on."""
import json

import numpy as np
import torch
import torch.nn.functional as F

import evaluate
import fit_metric
import metric_learning as ml
import trainer2
import training
from conftest import tiny_args
from inference import FaceModel


def nuisance_embeddings(people=60, per=6, seed=0):
    """Identity in 8 weak directions, a per-photo nuisance (pose, light) in 8 strong ones."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(people, 8, generator=g)
    ids = np.repeat(np.arange(people), per)
    nuisance = 4 * torch.randn(len(ids), 8, generator=g)
    return torch.cat([centres[ids] + 0.2 * torch.randn(len(ids), 8, generator=g), nuisance],
                     1), ids


def test_wccn_removes_the_within_person_spread_that_raw_cosine_ranks_by():
    emb, ids = nuisance_embeddings()
    fit_half, test_half = np.isin(ids, np.arange(30)), np.isin(ids, np.arange(30, 60))
    mean, proj = ml.fit(emb[fit_half], ids[fit_half], 16, "wccn")
    raw = ml.pair_auc(emb[test_half], ids[test_half])
    learned = ml.pair_auc(ml.apply(emb[test_half], mean, proj), ids[test_half])
    assert raw < 0.8 and learned > 0.95, (raw, learned)
    # on the people it was fitted on, the within-person covariance is the identity
    z = ml.apply(emb[fit_half], mean, proj).double()
    fitted_ids = ids[fit_half]
    d = torch.cat([z[fitted_ids == p] - z[fitted_ids == p].mean(0) for p in range(30)])
    within = d.T @ d / (len(z) - 30)
    assert torch.allclose(within, torch.eye(16, dtype=within.dtype), atol=0.05)
    # whitening alone makes the total spread round
    mean, proj = ml.fit(emb, ids, 4, "whiten")
    z = ml.apply(emb, mean, proj).double()
    assert proj.shape == (16, 4)
    assert torch.allclose(z.T @ z / (len(z) - 1), torch.eye(4, dtype=z.dtype), atol=0.01)


def test_select_chooses_on_people_it_did_not_fit_and_reports_every_choice():
    emb, ids = nuisance_embeddings(seed=1)
    kind, dim, tried = ml.select(emb, ids)
    assert kind == "wccn" and dim == 16      # the only size up to the embedding's 16
    assert set(tried) == {"raw", "whiten-16", "wccn-16"}
    assert tried["wccn-16"] > tried["raw"] + 0.15
    a, b = ml.halves(set(ids.tolist()))
    assert not set(a) & set(b) and len(a) + len(b) == 60


def test_a_fitted_checkpoint_scores_with_its_map_everywhere(synthetic_lfw, tmp_path, capsys):
    run = tmp_path / "base"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, run, epochs=2,
                                                   val_fraction=0.5, val_pairs=80)) == 0
    out = tmp_path / "metric"
    assert fit_metric.main([str(run), "--out", str(out)]) == 0
    assert "validation people; on the other half's" in capsys.readouterr().out
    fm, base = FaceModel.load(out / "best_accuracy.pt"), FaceModel.load(run)
    ckpt = fm.ckpt
    info = ckpt["metric"]
    # validated only on the half it was not fitted on
    assert set(info["fit_people"]) < set(ckpt["val_people"])
    assert 0 < info["pairs"] < len(base.ckpt["val_people"]) * 100
    assert set(ckpt["operating_points"]["points"]) == {"0.01", "0.001", "0.0001"}
    assert ckpt["threshold"] == ckpt["metrics"]["threshold"]
    # its score is the cosine of the base embeddings, normalised, centred and mapped
    faces = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    e = base.embed(faces)
    mapped = ml.apply(e, fm.net.backbone.mean, fm.net.backbone.proj)
    assert torch.allclose(fm.embed(faces), mapped, atol=1e-4)
    expected = F.cosine_similarity(mapped[:3], mapped[3:]) - 1
    assert torch.allclose(fm.score(*fm.embed(faces).split(3)), expected, atol=1e-5)
    assert evaluate.main([str(out / "best_accuracy.pt"), "--data", str(synthetic_lfw / "images"),
                          "--pairs", str(synthetic_lfw / "pairsDevTest.txt"), "--out",
                          str(tmp_path / "eval")]) == 0
    assert 0 <= json.loads((tmp_path / "eval" / "results.json").read_text())["kfold"]["mean"] <= 1
    capsys.readouterr()  # evaluate's progress bars
    # a metric on a metric is refused in one line, and nothing is written
    assert fit_metric.main([str(out / "best_accuracy.pt"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has a learned metric already" in err
    assert not (tmp_path / "x").exists()


def test_a_head_net_or_too_few_people_is_refused_in_one_line(synthetic_lfw, tmp_path, capsys):
    bce = tmp_path / "bce"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, bce, epochs=1, loss="bce",
                                                   distance="l1")) == 0
    few = tmp_path / "few"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, few, epochs=1,
                                                   val_fraction=0.1)) == 0
    capsys.readouterr()
    for run, why in ((bce, "learned head or an L1"), (few, "too few")):
        assert fit_metric.main([str(run), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err, err
    assert not (tmp_path / "x" / "best_accuracy.pt").exists()
