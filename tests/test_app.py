"""app.py driven by Streamlit's AppTest: a tiny untrained checkpoint, generated images and
the public-domain astronaut photo from scikit-image. Streamlit 1.67's AppTest uploads files
itself (at.file_uploader[i].set_value((name, bytes, mime))), so the real upload path runs."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import app
import faces
import model

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 120  # the first run loads MTCNN; CI machines are slow


def jpeg(array, quality=90):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()  # 512x512 RGB, one clear face, public domain


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """logs/<run>/best_accuracy.pt in training.py's checkpoint format, with a metrics.csv and
    an evaluation, built directly (no training: the page only needs a loadable net)."""
    torch.manual_seed(0)
    cfg = {"model": "compact", "image_size": 64, "embedding_dim": 32, "loss": "arcface",
           "distance": "cosine", "drop_layer4": False, "head_hidden": 1024, "head_depth": 1,
           "activation": "sigmoid", "p": 0.0, "init": "kaiming"}
    net = model.build_model(cfg).eval()
    row = {"epoch": 2, "step": 20, "minutes": 0.1, "lr": 0.1, "train_loss": 1.5, "loss": 0.7,
           "accuracy": 0.61, "precision": 0.6, "recall": 0.62, "f1": 0.61, "auc": 0.66,
           "threshold": -0.4, "images_per_s": 100.0}
    root = tmp_path_factory.mktemp("logs")
    run = root / "compact-arcface-test"
    run.mkdir()
    torch.save({"model": net.state_dict(), "model_config": {k: cfg[k] for k in model.MODEL_KEYS},
                "config": cfg, "epoch": 2, "step": 20, "metrics": row, "threshold": -0.4,
                "train_people": [], "git_commit": "test"}, run / "best_accuracy.pt")
    header = list(row)
    lines = [",".join(header)] + [",".join(str({**row, "epoch": e}[k]) for k in header)
                                  for e in (1, 2)]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    (run / "eval-test").mkdir()
    (run / "eval-test" / "results.json").write_text(json.dumps(
        {"pairs": "dataset/pairsDevTest.txt", "n_pairs": 1000, "auc": 0.66, "eer": 0.38,
         "tar@far=1e-3": 0.01, "kfold": {"mean": 0.6, "stderr": 0.01}, "contaminated": False}))
    Image.new("RGB", (64, 64), "white").save(run / "eval-test" / "roc.png")
    return root


def start(monkeypatch, logs, data=None):
    monkeypatch.setenv("LFW_DEMO_LOGS", str(logs))
    monkeypatch.setenv("LFW_DEMO_DATA", str(data or logs / "no-dataset"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def texts(at):
    """Everything the page wrote, as one string."""
    parts = [e.value for kind in ("error", "warning", "success", "info", "markdown", "caption")
             for e in getattr(at, kind)]
    return "\n".join(map(str, parts))


def test_no_checkpoint_shows_the_training_command(monkeypatch, tmp_path):
    at = start(monkeypatch, tmp_path)
    assert len(at.error) == 1
    assert "make train" in at.error[0].value and "python trainer2.py" in at.error[0].value
    assert not at.file_uploader  # nothing to score with, so no inputs


def test_two_uploads_give_a_verdict_and_the_run_results(monkeypatch, logs, astronaut):
    at = start(monkeypatch, logs)
    assert "compact, arcface, val acc 0.610" in at.selectbox[0].options[0]
    assert at.slider[0].value == pytest.approx(-0.4)  # the checkpoint's own threshold
    at.file_uploader[0].set_value(("astronaut.jpg", jpeg(astronaut), "image/jpeg"))
    at.file_uploader[1].set_value(("mirror.jpg", jpeg(astronaut[:, ::-1].copy()), "image/jpeg"))
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    verdicts = [e.value for e in (*at.success, *at.warning) if e.value.startswith("Verdict:")]
    assert verdicts and verdicts[0] in ("Verdict: Same person", "Verdict: Different people")
    assert any(m.label == "Threshold" for m in at.metric)
    # From eval-*/results.json as evaluate.py writes it.
    assert {m.label: m.value for m in at.metric}["accuracy (10-fold)"] == "0.6000 ± 0.0100"

    # The slider decides the verdict without new uploads: cosine scores lie in [-2, 0].
    at.slider[0].set_value(-2.0).run()
    assert [e.value for e in at.success] == ["Verdict: Same person"]
    at.slider[0].set_value(0.0).run()
    assert [e.value for e in at.warning] == ["Verdict: Different people"]


def test_non_image_and_faceless_uploads_get_a_message_not_a_traceback(monkeypatch, logs):
    at = start(monkeypatch, logs)
    at.file_uploader[0].set_value(("notes.txt", b"not a photo at all", "text/plain"))
    blank = np.full((200, 200, 3), 128, dtype=np.uint8)
    at.file_uploader[1].set_value(("wall.jpg", jpeg(blank), "image/jpeg"))
    at.run()
    assert not at.exception, at.exception
    errors = "\n".join(e.value for e in at.error)
    assert "notes.txt: not a readable image" in errors
    assert "wall.jpg: no face found" in errors
    assert "Verdict:" not in texts(at)


def test_example_pair_button_needs_the_lfw_copy(monkeypatch, logs, astronaut, tmp_path):
    at = start(monkeypatch, logs)
    assert not at.button  # no dataset/: no example button

    data = tmp_path / "lfw"
    for name in ("Ann_A", "Bob_B"):
        (data / "images" / name).mkdir(parents=True)
        for i in (1, 2):
            (data / "images" / name / f"{name}_{i:04d}.jpg").write_bytes(jpeg(astronaut))
    (data / "pairsDevTest.txt").write_text("1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t2\n")
    at = start(monkeypatch, logs, data)
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert any(e.value.startswith("Verdict:") for e in (*at.success, *at.warning))
    assert "LFW (pairsDevTest.txt) says:" in texts(at)


def test_size_limits_are_checked_before_decoding(monkeypatch):
    with pytest.raises(faces.FaceError, match="over the 20 MB limit"):
        app.check_photo(b"\0" * (app.MAX_BYTES + 1), "big.jpg")
    # A PNG header claiming 10000 x 6000 pixels: refused from the header alone.
    buf = io.BytesIO()
    Image.new("L", (10000, 6000)).save(buf, format="PNG", compress_level=1)
    with pytest.raises(faces.FaceError, match="60 megapixels is over the 50 megapixel limit"):
        app.check_photo(buf.getvalue(), "huge.png")
    app.check_photo(jpeg(np.zeros((32, 32, 3), np.uint8)), "small.jpg")  # fine
