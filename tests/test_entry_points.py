"""Every command-line entry point scores through inference.FaceModel: for the same two photos
(scikit-image's public-domain astronaut and her mirror image), verify.py, identify.py and
evaluate.py give the score FaceModel.score_faces gives for the two faces FaceModel.face finds,
with the shipped model. (The demo's pages are held to it in tests/test_app.py.)"""
import csv
import json
import shutil

import pytest
import torch
from torchvision.io import encode_png

import evaluate
import faces
import identify
import model as m
import verify
from inference import FaceModel
from conftest import write_jpeg as jpeg

pytestmark = pytest.mark.skipif(not m.SHIPPED.is_file(),
                                reason="no model is shipped in models/lfw-compact.pt")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def same(tmp_path_factory):
    """The two photos, their faces as FaceModel finds them, and the score it gives them."""
    from skimage.data import astronaut
    root = tmp_path_factory.mktemp("entry_points")
    a = jpeg(root / "astronaut.jpg", astronaut())
    b = jpeg(root / "mirror.jpg", astronaut()[:, ::-1])
    fm = FaceModel.load(m.SHIPPED)
    (face_a, _), (face_b, _) = (fm.face(faces.read_image(p)) for p in (a, b))
    return {"root": root, "a": a, "b": b, "face_a": face_a, "face_b": face_b,
            "score": fm.score_faces(face_a, face_b)}


def output(capsys, main, *argv):
    code = main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_mirror_is_not_the_same_image(same):
    """Otherwise every entry point would score a perfect match and agree trivially."""
    assert not torch.equal(same["face_a"], same["face_b"])
    assert same["score"] < 0  # a distance, negated: below the perfect 0 of one image twice


def test_verify_gives_the_face_models_score(same, capsys):
    code, out, err = output(capsys, verify.main, same["a"], same["b"], "--checkpoint",
                            m.SHIPPED, "--json")
    assert code in (0, 1), err
    assert json.loads(out)["score"] == pytest.approx(same["score"], abs=TOLERANCE)


def test_identify_gives_the_face_models_score(same, tmp_path, capsys):
    gallery = tmp_path / "gallery"
    (gallery / "Eileen").mkdir(parents=True)
    shutil.copy(same["b"], gallery / "Eileen" / "mirror.jpg")
    code, out, err = output(capsys, identify.main, gallery, same["a"], "--checkpoint",
                            m.SHIPPED, "--json")
    assert code == 0, err
    [face] = json.loads(out)[0]["faces"]
    assert face["top"][0]["person"] == "Eileen"
    assert face["score"] == pytest.approx(same["score"], abs=TOLERANCE)


def test_evaluate_gives_the_face_models_score(same, tmp_path, capsys):
    """The two faces saved losslessly (PNG) as <person>/<image> crops and scored as a pair
    of a CSV (with others beside it: evaluate.py needs two of each kind to cut folds)."""
    crops = tmp_path / "crops"
    for person, name, face in (("Eileen", "a.png", same["face_a"]),
                               ("Eileen", "b.png", same["face_b"]),
                               ("Other", "c.png", same["face_a"].flip(1))):
        (crops / person).mkdir(parents=True, exist_ok=True)
        (crops / person / name).write_bytes(encode_png(face).numpy().tobytes())
    table = tmp_path / "pairs.csv"
    table.write_text("path_a,path_b,same\nEileen/a.png,Eileen/b.png,1\n"
                     "Eileen/b.png,Eileen/a.png,1\nEileen/a.png,Other/c.png,0\n"
                     "Other/c.png,Eileen/b.png,0\n")
    code, _, err = output(capsys, evaluate.main, m.SHIPPED, "--pairs", table, "--data", crops,
                          "--out", tmp_path / "out")
    assert code == 0, err
    with open(tmp_path / "out" / "scores.csv", newline="") as f:
        rows = {(r["path_a"], r["path_b"]): float(r["score"]) for r in csv.DictReader(f)}
    assert rows[("Eileen/a.png", "Eileen/b.png")] == pytest.approx(same["score"], abs=TOLERANCE)
