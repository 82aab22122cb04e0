"""ship_model.py: a small half-precision checkpoint in models/ that verify.py, identify.py and
the demo use when logs/ holds no run of one's own."""
import json
from pathlib import Path

import pytest
import torch

import dataset as ds
import model as m
from inference import FaceModel
import ship_model
import training
import trainer2
import verify
from conftest import small_lfw, tiny_args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from skimage.data import astronaut
    from PIL import Image
    root = tmp_path_factory.mktemp("ship")
    small_lfw(root)
    assert training.main(vars(trainer2), tiny_args(root, root / "run", epochs=1)) == 0
    Image.fromarray(astronaut()).save(root / "astronaut.jpg", quality=95)
    return root


def test_the_shipped_file_is_half_precision_weights_that_load_safely(trained, tmp_path):
    out = tmp_path / "models" / "lfw-compact.pt"
    assert ship_model.main([str(trained / "run" / "best_accuracy.pt"), "--out", str(out)]) == 0
    small = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in small["model"].values() if v.is_floating_point())
    assert out.stat().st_size < ship_model.MAX_MB * 2 ** 20
    full_net, full = m.load_checkpoint(trained / "run" / "best_accuracy.pt")
    net, ckpt = m.load_checkpoint(out)
    assert ckpt["threshold"] == full["threshold"] and ckpt["crop"] == full["crop"]
    x = ds.eval_transform()(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        half, whole = net.embed(x), full_net.embed(x)
    # Half precision moves each value by about 1e-3 of its size; scores use the direction.
    assert ((half - whole).norm(dim=1) / whole.norm(dim=1)).max() < 1e-2
    assert torch.nn.functional.cosine_similarity(half, whole).min() > 0.9999
    text = (out.parent / "MODEL_CARD.md").read_text()
    assert f"{full['threshold']:.4f}" in text and "LFW only" in text and "Known limits" in text
    # Its thresholds by false-accept rate travel with it, and the card says them.
    assert ckpt["operating_points"] == full["operating_points"]
    assert ckpt["val_people"] == full["val_people"] and ckpt["source"] == str(
        trained / "run" / "best_accuracy.pt")
    for key, point in full["operating_points"]["points"].items():
        assert f"FAR {key}: {point['threshold']:.4f}" in text
    # Re-shipping the shipped file keeps where it was made from.
    again = tmp_path / "again" / "lfw-compact.pt"
    assert ship_model.main([str(out), "--out", str(again)]) == 0
    assert torch.load(again, weights_only=True)["source"] == ckpt["source"]
    assert f"Made from `{ckpt['source']}`" in (again.parent / "MODEL_CARD.md").read_text()


def test_a_checkpoint_without_far_thresholds_is_not_shipped(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "run" / "best_accuracy.pt", weights_only=True)
    del ckpt["operating_points"]
    torch.save(ckpt, tmp_path / "old.pt")
    assert ship_model.main([str(tmp_path / "old.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert f"python calibrate.py {tmp_path / 'old.pt'}" in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_scripts_use_the_shipped_model_when_logs_hold_no_run(trained, tmp_path, monkeypatch,
                                                             capsys):
    shipped = tmp_path / "models" / "lfw-compact.pt"
    ship_model.main([str(trained / "run" / "best_accuracy.pt"), "--out", str(shipped)])
    monkeypatch.setattr(m, "SHIPPED", shipped.resolve())
    monkeypatch.chdir(tmp_path)
    photo = trained / "astronaut.jpg"
    capsys.readouterr()
    assert verify.main([str(photo), str(photo), "--threshold=-1e9"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("model: the shipped models/lfw-compact.pt (logs/ holds no run")
    (tmp_path / "logs" / "mine").mkdir(parents=True)  # a run of one's own takes precedence
    (tmp_path / "logs" / "mine" / "best_accuracy.pt").write_bytes(
        (trained / "run" / "best_accuracy.pt").read_bytes())
    assert m.resolve_checkpoint() == m.Path("logs/mine/best_accuracy.pt")


def test_a_checkpoint_that_cannot_take_faces_is_not_shipped(trained, tmp_path, capsys):
    ckpt = torch.load(trained / "run" / "best_accuracy.pt", weights_only=True)
    ckpt["crop"] = None
    torch.save(ckpt, tmp_path / "photos.pt")
    assert ship_model.main([str(tmp_path / "photos.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "crop_settings.json" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()


# Recorded when the model was shipped (ship_model.py); re-record it when a new model is shipped.
RECORDED = Path(__file__).parent / "data" / "shipped_astronaut_embedding.json"


@pytest.mark.skipif(not m.SHIPPED.is_file(), reason="no model is shipped in models/ yet")
def test_the_shipped_model_embeds_the_astronaut_as_recorded():
    """The photo-to-embedding path, end to end through MTCNN, still gives the shipped model's
    recorded embedding: a change to detection, alignment, resizing or the network shows."""
    from skimage.data import astronaut
    fm = FaceModel.load(m.SHIPPED)
    fm.amp = False  # the embedding was recorded in fp32, the same on every CPU
    image = torch.from_numpy(astronaut()).permute(2, 0, 1).contiguous()
    face, _ = fm.face(image)
    e = fm.embed([face])
    e = torch.nn.functional.normalize(e)[0]
    recorded = torch.tensor(json.loads(RECORDED.read_text())["embedding"])
    # A tolerance, not a hash: float rounding differs across CPUs and library builds.
    assert e.shape == recorded.shape
    assert float(e @ recorded) > 0.999 and float((e - recorded).abs().max()) < 0.01


def test_the_demo_uses_the_shipped_model_when_logs_hold_no_run(trained, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest
    shipped = tmp_path / "models" / "lfw-compact.pt"
    ship_model.main([str(trained / "run" / "best_accuracy.pt"), "--out", str(shipped)])
    monkeypatch.setattr(m, "SHIPPED", shipped.resolve())
    monkeypatch.setenv("LFW_DEMO_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("LFW_DEMO_DATA", str(tmp_path / "no-data"))
    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"),
                           default_timeout=120)
    photo = (trained / "astronaut.jpg").read_bytes()
    at.session_state["photo_a"] = {"name": "a.jpg", "data": photo}
    at.session_state["photo_b"] = {"name": "b.jpg", "data": photo}
    at.run()
    assert not at.exception and not at.error
    assert any("the shipped models/lfw-compact.pt" in i.value for i in at.info)
    assert any("Same person" in s.value for s in list(at.success) + list(at.warning))
