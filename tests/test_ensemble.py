"""ensemble.py and --member_seed on the synthetic LFW: members of one people split, an
ensemble that scores the mean of their cosines, and one-line refusals of members that do not
fit together."""
import json

import pytest
import torch

import ensemble
import evaluate
import losses
import model as m
import trainer2
import training
from conftest import tiny_args
from inference import FaceModel


def train(root, run_dir, **kw):
    assert training.main(vars(trainer2), tiny_args(root, run_dir, epochs=2, **kw)) == 0
    return run_dir


@pytest.fixture
def members(synthetic_lfw, tmp_path):
    """Two runs on one people split, another member_seed each, one in fp32."""
    return (train(synthetic_lfw, tmp_path / "a"),
            train(synthetic_lfw, tmp_path / "b", member_seed=1, mixed_precision=False))


def test_member_seed_changes_the_net_but_not_the_people(members, synthetic_lfw, tmp_path):
    a, b = (torch.load(r / "best_accuracy.pt", weights_only=True) for r in members)
    assert a["val_people"] == b["val_people"] and a["train_people"] == b["train_people"]
    key = next(k for k in a["model"] if k.endswith("weight"))
    assert not torch.equal(a["model"][key], b["model"][key])
    # member_seed=0 is the seed alone: the same run as before the setting existed
    again = torch.load(train(synthetic_lfw, tmp_path / "a0", member_seed=0) / "best_accuracy.pt",
                       weights_only=True)
    assert torch.equal(again["model"][key], a["model"][key])


def test_the_ensemble_scores_the_mean_of_its_members_cosines(members, synthetic_lfw, tmp_path,
                                                             capsys):
    out = tmp_path / "ens"
    assert ensemble.main([str(members[0]), str(members[1]), "--out", str(out)]) == 0
    assert "ensemble of 2: validation accuracy" in capsys.readouterr().out
    fm = FaceModel.load(out / "best_accuracy.pt")
    parts = [FaceModel.load(r) for r in members]
    faces = torch.randint(0, 255, (6, 3, 32, 32), dtype=torch.uint8)
    e = fm.embed(faces)
    assert e.shape[1] == sum(p.embed(faces[:1]).shape[1] for p in parts)
    expected = sum(p.score(p.embed(faces[:3]), p.embed(faces[3:])) for p in parts) / 2
    assert torch.allclose(fm.score(e[:3], e[3:]), expected, atol=1e-5)
    ckpt = fm.ckpt  # validated as training validates: thresholds, FAR points, people
    assert ckpt["threshold"] == ckpt["metrics"]["threshold"]
    assert set(ckpt["operating_points"]["points"]) == {"0.01", "0.001", "0.0001"}
    assert ckpt["val_people"] == parts[0].ckpt["val_people"]
    # evaluate.py scores it like any checkpoint
    assert evaluate.main([str(out / "best_accuracy.pt"), "--data", str(synthetic_lfw / "images"),
                          "--pairs", str(synthetic_lfw / "pairsDevTest.txt"), "--out",
                          str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 <= result["kfold"]["mean"] <= 1


def test_members_of_other_people_or_sizes_are_refused_in_one_line(members, synthetic_lfw,
                                                                  tmp_path, capsys):
    other = train(synthetic_lfw, tmp_path / "other-seed", seed=3)
    small = train(synthetic_lfw, tmp_path / "small", member_seed=2, image_size=24)
    capsys.readouterr()  # the training's progress bars
    for bad, why in ((other, "other people"), (small, "its input is 24 px")):
        assert ensemble.main([str(members[0]), str(bad), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(bad) in err and why in err, err
    assert ensemble.main([str(members[0]), "--out", str(tmp_path / "x")]) == 2
    assert "two members or more" in capsys.readouterr().err
    assert not (tmp_path / "x" / "best_accuracy.pt").exists()


def test_an_ensemble_checkpoint_rebuilds_from_its_config_alone(members, tmp_path):
    assert ensemble.main([str(r) for r in members] + ["--out", str(tmp_path / "e")]) == 0
    net, ckpt = m.load_checkpoint(tmp_path / "e" / "best_accuracy.pt")
    assert ckpt["model_config"]["model"] == "ensemble"
    assert ckpt["model_config"]["member_precision"] == [True, False]
    assert net.backbone.out_dim == sum(c["embedding_dim"] for c in ckpt["model_config"]["members"])


# ---------------------------------------------------------------- distilling an ensemble

def test_similarity_matching_is_zero_for_the_teachers_geometry_and_grows_away_from_it():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 8, generator=g)
    assert losses.similarity_matching_loss(3 * t, t).item() == pytest.approx(0, abs=1e-6)
    # any embedding size: a rotation into 12 dimensions keeps every cosine
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    wide = torch.cat([t, torch.zeros(6, 4)], 1) @ q
    assert losses.similarity_matching_loss(wide, t).item() == pytest.approx(0, abs=1e-6)
    s = torch.randn(6, 8, generator=g)
    sn, tn = torch.nn.functional.normalize(s), torch.nn.functional.normalize(t)
    diff = (sn @ sn.T - tn @ tn.T)[~torch.eye(6, dtype=torch.bool)]
    assert losses.similarity_matching_loss(s, t).item() == pytest.approx(diff.pow(2).mean().item())


def test_a_student_distils_an_ensemble_into_one_plain_network(members, synthetic_lfw, tmp_path):
    teacher = tmp_path / "ens"
    assert ensemble.main([str(r) for r in members] + ["--out", str(teacher)]) == 0
    runs = {w: train(synthetic_lfw, tmp_path / f"student-{w}", loss="distill", embedding_dim=16,
                     teacher=teacher / "best_accuracy.pt", distill_weight=w) for w in (0.0, 50.0)}
    net, ckpt = m.load_checkpoint(runs[50.0] / "best_accuracy.pt")
    # one network of its own size: no teacher weights in the checkpoint or the resume state
    assert ckpt["model_config"]["model"] != "ensemble" and net.backbone.out_dim == 16
    plain = torch.load(members[0] / "best_accuracy.pt", weights_only=True)["model"]
    assert set(ckpt["model"]) == set(plain)
    last = torch.load(runs[50.0] / "last.pt", weights_only=True)
    arcface = torch.load(members[0] / "last.pt", weights_only=True)
    assert set(last["model"]) == set(arcface["model"])  # the net and ArcFace's centres only
    # the teacher's term moves training
    other = torch.load(runs[0.0] / "best_accuracy.pt", weights_only=True)["model"]
    assert any(not torch.equal(other[k], ckpt["model"][k]) for k in other)


def test_a_teacher_of_other_people_or_size_is_refused_in_one_line(members, synthetic_lfw,
                                                                 tmp_path, capsys):
    other = train(synthetic_lfw, tmp_path / "other-seed", seed=3)
    capsys.readouterr()
    for teacher, extra, why in ((other / "best_accuracy.pt", {}, "validated on other people"),
                                (members[0] / "best_accuracy.pt", {"image_size": 24},
                                 "takes 32 px faces"),
                                (tmp_path / "none.pt", {}, "no such checkpoint")):
        args = tiny_args(synthetic_lfw, tmp_path / "student", loss="distill", teacher=teacher,
                         **extra)
        assert training.main(vars(trainer2), args) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and str(teacher) in errors[0] and why in errors[0], errors
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, tmp_path / "s2",
                                                   loss="distill")) == 1
    assert "needs --teacher=PATH" in capsys.readouterr().err
