"""The demo (app.py and its pages in demo_pages/) driven by Streamlit's AppTest: a tiny
untrained checkpoint, generated images and scikit-image's public-domain astronaut and
cameraman photos. A page is reached as a user reaches it, through the navigation
(at.switch_page). Streamlit's AppTest uploads
files itself (at.file_uploader[i].set_value((name, bytes, mime))), so the real upload path
runs.

The fixture net is untrained but deterministic (seed 0): the same photo twice scores 0
(cosine similarity 1), the astronaut and her mirror image about -0.13, the astronaut and the
cameraman about -0.51. Its threshold, -0.3, puts each of these pairs on a known side, outside
the close-call band (±0.105 at that threshold), so the tests assert exact verdicts.
"""
import io
import json
import os
import struct
import tomllib
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

import app
import demo
import faces
import identify
import losses
import model
from demo_pages import same_person
from inference import FaceModel

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
SAME_PERSON, WHO_IS_THIS = "demo_pages/same_person.py", "demo_pages/who_is_this.py"
TIMEOUT = 120  # the first run loads MTCNN; CI machines are slow
THRESHOLD = -0.3
CFG = {"model": "compact", "image_size": 64, "embedding_dim": 32, "loss": "arcface",
       "distance": "cosine", "drop_layer4": False, "head_hidden": 1024, "head_depth": 1,
       "activation": "sigmoid", "p": 0.0, "init": "kaiming"}


def jpeg(array, quality=90):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_claiming(width, height):
    """A tiny real PNG whose header claims width x height: IHDR patched, CRC redone, so
    that only a reader that trusts the header (and decodes nothing) sees the claimed size."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    # 8-byte signature, then IHDR: length (4), type (4), width (4), height (4), ..., CRC (4)
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data")
    return jpeg(skimage_data.astronaut())  # 512x512 RGB, one clear face, public domain


@pytest.fixture(scope="module")
def cameraman():
    skimage_data = pytest.importorskip("skimage.data")
    return jpeg(np.stack([skimage_data.camera()] * 3, axis=-1))  # another person, public domain


def write_checkpoint(path, **extra):
    """A best_*.pt in training.py's format (crop settings included), built directly: no
    training, the page only needs a loadable, deterministic net."""
    torch.manual_seed(0)
    net = model.build_model(CFG).eval()
    row = {"accuracy": 0.61, "precision": 0.6, "recall": 0.62, "f1": 0.61, "auc": 0.66,
           "loss": 0.17, "threshold": THRESHOLD}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(),
                "model_config": model.ModelConfig.from_dict(CFG).to_dict(),  # as training.py
                "config": CFG, "epoch": 2, "step": 20, "metrics": row, "threshold": THRESHOLD,
                "crop": faces.crop_settings(), "train_people": [], "git_commit": "test", **extra},
               path)


def write_evaluation(run, name, accuracy, contaminated, mtime):
    folder = run / name
    folder.mkdir()
    pairs = "pairsDevTest.txt" if not contaminated else "pairs.txt"
    (folder / "results.json").write_text(json.dumps(
        {"checkpoint": str(run / "best_accuracy.pt"), "pairs": f"dataset/{pairs}",
         "n_pairs": 1000, "auc": 0.9612, "eer": 0.096, "tar@far=1e-3": 0.222,
         "kfold": {"mean": accuracy, "stderr": 0.0041}, "contaminated": contaminated,
         "people_seen_in_training": 4000 if contaminated else 0, "people_in_pairs": 5749}))
    Image.new("RGB", (64, 64), "white").save(folder / "roc.png")
    os.utime(folder / "results.json", (mtime, mtime))


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """logs/<run>/best_accuracy.pt with a metrics.csv whose two losses differ in scale (as a
    real arcface run's do), an honest View 1 evaluation and a newer contaminated one."""
    root = tmp_path_factory.mktemp("logs")
    run = root / "compact-arcface-20250101-120000"
    write_checkpoint(run / "best_accuracy.pt")
    lines = ["epoch,train_loss,loss,accuracy,auc,threshold"] + [
        f"{e},{loss},{0.17 + 0.01 * e},0.6,0.66,{THRESHOLD}" for e, loss in ((1, 25.0), (2, 1.3))]
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    write_evaluation(run, "eval-pairsDevTest-flip", 0.898, False, mtime=1_000_000)
    write_evaluation(run, "eval-pairs-flip", 0.948, True, mtime=2_000_000)  # the newest
    return root


def start(monkeypatch, logs, data=None):
    monkeypatch.setenv("LFW_DEMO_LOGS", str(logs))
    monkeypatch.setenv("LFW_DEMO_DATA", str(data or logs / "no-dataset"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def upload(at, a, b):
    """Upload (name, bytes) pairs into boxes A and B (None leaves a box as it is), then run."""
    for box, photo in zip(at.file_uploader, (a, b)):
        if photo is not None:
            mime = "image/jpeg" if photo[0].endswith(".jpg") else "application/octet-stream"
            box.set_value((*photo, mime))
    at.run()
    assert not at.exception, at.exception
    return at


def texts(at):
    """Everything the page wrote, as one string."""
    parts = [e.value for kind in ("error", "warning", "success", "info", "markdown", "caption",
                                  "text") for e in getattr(at, kind)]
    return "\n".join(map(str, parts))


def verdicts(at):
    """{style: [verdict texts]} of the verdict boxes on the page."""
    return {kind: [e.value for e in getattr(at, kind) if e.value.startswith("Verdict:")]
            for kind in ("success", "info", "warning", "error")}


def page_order(at):
    """The main area's element types, in the order a reader meets them."""
    return [getattr(node, "type", None) for node in at.main]


# ------------------------------------------------------------------ no model

def test_no_checkpoint_shows_the_training_command(monkeypatch, tmp_path):
    monkeypatch.setattr(model, "SHIPPED", tmp_path / "no-shipped-model.pt")
    at = start(monkeypatch, tmp_path)
    assert len(at.error) == 1
    assert "make train" in at.error[0].value and "python trainer2.py" in at.error[0].value
    assert not at.file_uploader  # nothing to score with, so no inputs


def test_unloadable_checkpoints_are_named_with_their_reason(monkeypatch, tmp_path):
    run = tmp_path / "broken-run"
    run.mkdir()
    (run / "best_accuracy.pt").write_bytes(b"half a checkpoint")
    torch.save({"weights": 1}, run / "best_auc.pt")
    write_checkpoint(run / "best_f1.pt")
    ckpt = torch.load(run / "best_f1.pt", weights_only=True)
    del ckpt["metrics"], ckpt["threshold"]
    torch.save(ckpt, run / "best_f1.pt")

    at = start(monkeypatch, tmp_path)
    message = at.error[0].value
    assert "no best_*.pt" not in message
    assert "3 best_*.pt file(s)" in message and "cannot be loaded" in message
    for name in ("best_accuracy.pt", "best_auc.pt"):  # model.load_checkpoint's own reason
        with pytest.raises(model.CheckpointError) as reason:
            model.load_checkpoint(run / name)
        assert f"- {reason.value}" in message
    assert f"- {run / 'best_f1.pt'}: loads, but has no metrics or threshold" in message

    # Beside a good checkpoint the page works and still says which files it left out; the
    # newest best_accuracy.pt does not load, so the default is the newest that does.
    write_checkpoint(tmp_path / "good-run" / "best_accuracy.pt")
    os.utime(run / "best_accuracy.pt", (2e9, 2e9))
    at = start(monkeypatch, tmp_path)
    assert not at.error
    assert at.sidebar.selectbox[0].value == "good-run"
    assert at.sidebar.expander[0].label == "3 checkpoint(s) cannot be loaded"
    assert f"{run / 'best_f1.pt'}: loads, but has no metrics or threshold" in texts(at)


# ------------------------------------------------------------------ the verdict

def test_same_photo_twice_is_same_person_and_another_face_is_not(monkeypatch, logs, astronaut,
                                                                 cameraman):
    at = upload(start(monkeypatch, logs), ("astronaut.jpg", astronaut), ("again.jpg", astronaut))
    assert not at.error, [e.value for e in at.error]
    assert verdicts(at) == {"success": ["Verdict: Same person"], "info": [], "warning": [],
                            "error": []}
    scores = {m.label: m.value for m in at.metric}
    assert scores["Threshold"] == "-0.300" and abs(float(scores["Score"])) < 1e-3
    # The verdict is read first: above both photos and their crops.
    order = page_order(at)
    assert order.index("success") < order.index("file_uploader") < order.index("image")
    assert "Score = the cosine similarity of the two face embeddings minus 1" in texts(at)

    upload(at, None, ("cameraman.jpg", cameraman))
    # "Different people" is a plain answer, not a warning.
    assert verdicts(at) == {"success": [], "info": ["Verdict: Different people"], "warning": [],
                            "error": []}


def test_threshold_slider_spans_real_scores_and_near_ones_are_close_calls(monkeypatch, logs,
                                                                          astronaut):
    at = start(monkeypatch, logs)
    slider = at.sidebar.slider[0]
    assert slider.value == pytest.approx(THRESHOLD)  # the checkpoint's own
    # cos - 1 scores, threshold -0.3: half-span max(0.3, 0.7), cut at the 0 of identical faces.
    assert (slider.min, slider.max) == (pytest.approx(-1.0), pytest.approx(0.0))
    upload(at, ("astronaut.jpg", astronaut), ("mirror.jpg", jpeg(np.asarray(
        Image.open(io.BytesIO(astronaut)))[:, ::-1].copy())))
    assert verdicts(at)["success"] == ["Verdict: Same person"]  # about -0.13, margin +0.17

    # The same pair 0.05 above a moved threshold: inside the ±0.105 band, not a certainty.
    score = float({m.label: m.value for m in at.metric}["Score"])
    at.sidebar.slider[0].set_value(score - 0.05).run()
    assert verdicts(at)["warning"] == ["Verdict: Same person (close call)"]
    at.sidebar.slider[0].set_value(score + 0.05).run()
    assert verdicts(at)["warning"] == ["Verdict: Different people (close call)"]
    at.sidebar.slider[0].set_value(-1.0).run()  # the slider alone changes the verdict
    assert verdicts(at)["success"] == ["Verdict: Same person"]


# The fixture net's score of the astronaut and its mirror image is about -0.13.
POINTS = {"points": {"0.01": {"far": 1e-2, "threshold": -0.5, "tar": 0.8},
                     "0.0001": {"far": 1e-4, "threshold": -0.02, "tar": 0.1}},
          "accuracy": {"threshold": THRESHOLD, "far": 0.08, "tar": 0.9},
          "n_people": 40, "n_same": 300, "n_different": 90_000}


def strictness_box(at):
    return next(b for b in at.sidebar.selectbox if b.label == "Strictness")


def test_strictness_sets_the_threshold_and_changes_a_close_pairs_verdict(monkeypatch,
                                                                           tmp_path, astronaut):
    run = tmp_path / "compact-arcface-20250101-120000"
    write_checkpoint(run / "best_accuracy.pt", operating_points=POINTS)
    at = start(monkeypatch, tmp_path)
    strictness = strictness_box(at)
    assert strictness.options == ["best accuracy", "1 in 100 strangers pass",
                                  "1 in 10,000 strangers pass"]
    assert at.sidebar.slider[0].value == pytest.approx(THRESHOLD)
    assert "about 1 in 12 different-person pairs score at or above -0.3000" in texts(at)
    upload(at, ("astronaut.jpg", astronaut), ("mirror.jpg", jpeg(np.asarray(
        Image.open(io.BytesIO(astronaut)))[:, ::-1].copy())))
    assert verdicts(at)["success"] == ["Verdict: Same person"]
    strictness_box(at).set_value("1 in 10,000 strangers pass")
    at.run()
    assert at.sidebar.slider[0].value == pytest.approx(-0.02)
    assert verdicts(at)["info"] == ["Verdict: Different people"]
    assert "On 40 validation people (90,000 different-person pairs), about 1 in 10,000" \
        in texts(at)
    at.sidebar.slider[0].set_value(-0.9).run()  # a threshold of one's own is said to be so
    assert "its false-accept rate was not measured" in texts(at)


def test_a_checkpoint_without_far_thresholds_offers_accuracy_only_and_names_the_fix(
        monkeypatch, logs):
    at = start(monkeypatch, logs)
    assert strictness_box(at).options == ["best accuracy"]
    assert "python calibrate.py" in texts(at)


@pytest.mark.parametrize("cfg, threshold, expected", [
    ({"loss": "arcface", "distance": "cosine"}, -0.6, (-1.2, 0.0, 0.6)),
    ({"loss": "arcface", "distance": "cosine"}, -1.9, (-2.0, 0.0, 1.9)),
    ({"loss": "bce", "distance": "l1"}, 0.5, (-2.5, 3.5, 3.0)),
    ({"loss": "contrastive", "distance": "l1"}, -4.0, (-8.0, 0.0, 4.0)),
])
def test_score_scale_covers_each_kind_of_score(cfg, threshold, expected):
    assert demo.score_scale(cfg, threshold) == pytest.approx(expected)


def test_a_loss_with_a_learned_head_is_scored_as_logits_whatever_its_name(monkeypatch):
    """The page asks losses.py whether a loss trains a pair head, never its name."""
    class Head(losses.Loss):
        name, batches, learned_head = "some_head", "pairs", True
    monkeypatch.setitem(losses.LOSSES, "some_head", Head)
    cfg = {"loss": "some_head", "distance": "cosine"}
    assert demo.score_scale(cfg, 0.5) == pytest.approx((-2.5, 3.5, 3.0))
    assert "logit" in demo.score_meaning(cfg)
    assert "logit" not in demo.score_meaning({"loss": "arcface", "distance": "cosine"})


def test_a_small_margin_is_a_close_call():
    # half 0.6 (a cosine model at -0.6): the band is ±0.09, so +0.066 is close and +0.2 is not.
    assert same_person.verdict(-0.534, -0.6, 0.6) == ("Verdict: Same person (close call)",
                                                      True, True)
    assert same_person.verdict(-0.4, -0.6, 0.6) == ("Verdict: Same person", True, False)
    assert same_person.verdict(-0.8, -0.6, 0.6) == ("Verdict: Different people", False, False)


# ------------------------------------------------------------------ failures

def test_non_image_and_faceless_uploads_say_why_there_is_no_verdict(monkeypatch, logs):
    blank = ("wall.jpg", jpeg(np.full((200, 200, 3), 128, dtype=np.uint8)))
    at = upload(start(monkeypatch, logs), ("notes.txt", b"not a photo at all"), blank)
    errors = [e.value for e in at.error]
    assert errors[0].startswith("No verdict: photo A (notes.txt) could not be read and photo B "
                                "(wall.jpg) has no face the detector could find.")
    assert "notes.txt: not a readable image" in errors[1]
    assert "wall.jpg: no face found" in errors[2]
    assert "Verdict:" not in texts(at)


def test_one_faceless_photo_is_named_as_the_reason(monkeypatch, logs, astronaut):
    blank = ("wall.jpg", jpeg(np.full((200, 200, 3), 128, dtype=np.uint8)))
    at = upload(start(monkeypatch, logs), ("astronaut.jpg", astronaut), blank)
    assert at.error[0].value.startswith(
        "No verdict: photo B (wall.jpg) has no face the detector could find.")
    assert "Verdict:" not in texts(at)


def test_decompression_bomb_reports_its_real_size(monkeypatch, logs):
    bomb = png_claiming(50_000, 50_000)
    assert len(bomb) < 100  # nothing near 2.5 G pixels is ever allocated
    with pytest.raises(faces.FaceError,
                       match=r"^bomb.png: 2,500 megapixels is over the 50 megapixel limit"):
        demo.read_photo(bomb, "bomb.png")
    at = upload(start(monkeypatch, logs), ("bomb.png", bomb), None)
    assert "bomb.png: 2,500 megapixels is over the 50 megapixel limit" in at.error[0].value


def test_size_limits_are_the_apps_bytes_and_faces_pixels(monkeypatch):
    with pytest.raises(faces.FaceError, match="over the 20 MB limit"):
        demo.read_photo(b"\0" * (demo.MAX_BYTES + 1), "big.jpg")
    small = jpeg(np.zeros((32, 32, 3), np.uint8))
    assert demo.read_photo(small, "small.jpg").shape == (3, 32, 32)
    # One pixel limit for the whole project: the app follows faces.MAX_PIXELS.
    monkeypatch.setattr(faces, "MAX_PIXELS", 1000)
    with pytest.raises(faces.FaceError, match="small.jpg: 0 megapixels is over the 0 megapixel"):
        demo.read_photo(small, "small.jpg")


# ------------------------------------------------------------------ the rest of the page

def test_honest_evaluation_comes_first_and_contaminated_is_labelled(monkeypatch, logs):
    at = start(monkeypatch, logs)
    figures = {m.label: m.value for m in at.metric}
    assert figures == {"Accuracy (10-fold)": "89.8% ± 0.4%", "AUC": "0.961", "EER": "9.6%",
                       "TAR @ FAR 0.1%": "22.2%"}
    assert any(c.value.startswith("eval-pairsDevTest-flip: 1000 pairs of pairsDevTest.txt, "
                                  "best_accuracy.pt. No test person was seen in training.")
               for c in at.caption)
    contaminated = [w.value for w in at.warning]
    assert contaminated == [
        "Also: accuracy 94.8% ± 0.4% on eval-pairs-flip: 1000 pairs of pairs.txt, "
        "best_accuracy.pt. Contaminated: 4000 of 5749 people in these pairs were seen in "
        "training, so its figures are optimistic."]


def test_training_and_validation_loss_get_a_chart_each(monkeypatch, logs):
    at = start(monkeypatch, logs)
    captions = [c.value for c in at.caption if c.value.endswith("by epoch")]
    assert captions == ["Validation accuracy and AUC by epoch", "Training loss by epoch",
                        "Validation loss by epoch"]
    charts = [json.loads(e.proto.spec) for e in at.main if getattr(e, "type", "") ==
              "vega_lite_chart"]
    assert len(charts) == 3
    # One quantity per loss chart, so each gets a y axis on its own scale.
    assert [c["layer"][0]["encoding"]["y"]["field"] for c in charts[1:]] == [
        "training loss", "validation loss"]


def test_picker_labels_are_short_and_file_names_are_shown_whole(monkeypatch, logs, astronaut):
    at = start(monkeypatch, logs)
    run, best, strictness = at.sidebar.selectbox
    assert strictness.label == "Strictness"
    assert run.options == ["compact-arcface-20250101-120000"]
    assert best.options == ["accuracy (val acc 61.0%)"]
    assert "compact / arcface / cosine, 64 px, epoch 2" in texts(at)
    name = "a_rather_long_file_name_from_a_phone_IMG_20240701_183015_HDR.jpg"
    at = upload(at, (name, astronaut), None)
    assert f"Photo A: {name}" in [t.value for t in at.text]


def test_example_pair_button_needs_the_lfw_copy(monkeypatch, logs, astronaut, cameraman,
                                                tmp_path):
    at = start(monkeypatch, logs)
    assert not at.button  # no dataset/: no example button

    data = tmp_path / "lfw"
    for name, photo in (("Ann_A", astronaut), ("Bob_B", cameraman)):
        (data / "images" / name).mkdir(parents=True)
        for i in (1, 2):
            (data / "images" / name / f"{name}_{i:04d}.jpg").write_bytes(photo)
    (data / "pairsDevTest.txt").write_text("1\nAnn_A\t1\t2\nAnn_A\t1\tBob_B\t2\n")
    at = start(monkeypatch, logs, data)
    at.button[0].click().run()
    assert not at.exception, at.exception
    # Either pair is on a known side for the fixture net, so the model agrees with LFW.
    same = "LFW (pairsDevTest.txt) says: the same person; the model agrees." in texts(at)
    different = "LFW (pairsDevTest.txt) says: different people; the model agrees." in texts(at)
    assert same != different
    expected = {"success": ["Verdict: Same person"]} if same else \
        {"info": ["Verdict: Different people"]}
    assert {k: v for k, v in verdicts(at).items() if v} == expected


def test_streamlit_config_turns_off_the_watcher_deploy_button_and_stats():
    from streamlit import config
    settings = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    options = {f"{section}.{key}": value for section, values in settings.items()
               for key, value in values.items()}
    assert options == {"server.address": "127.0.0.1", "server.fileWatcherType": "none",
                       "client.toolbarMode": "minimal", "browser.gatherUsageStats": False}
    for name in options:  # each is an option this Streamlit knows
        assert name in config._config_options_template, name


# ------------------------------------------------------------------ "Who is this?" (1:N)
# With the fixture net a cropped, rescaled astronaut scores about -0.02 against the astronaut
# and -0.51 against the cameraman: at the threshold of -0.3 the first is certainly her and a
# cameraman query against a gallery of her alone is certainly unknown.

@pytest.fixture(scope="module")
def astronaut_again():
    """A third photo of the astronaut: cropped and rescaled, so not the enrolled bytes."""
    skimage_data = pytest.importorskip("skimage.data")
    crop = Image.fromarray(skimage_data.astronaut()[20:400, 60:460]).resize((300, 285))
    return jpeg(np.asarray(crop))


def identify_page(monkeypatch, logs, gallery=None):
    """The app on its "Who is this?" page (LFW_DEMO_GALLERY set to gallery, if given)."""
    if gallery is None:
        monkeypatch.delenv("LFW_DEMO_GALLERY", raising=False)
    else:
        monkeypatch.setenv("LFW_DEMO_GALLERY", str(gallery))
    at = start(monkeypatch, logs)
    return switch(at, WHO_IS_THIS)


def switch(at, page):
    """Go to another page of the demo, as the sidebar's page links do."""
    at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def uploader(at, label):
    return next(u for u in at.file_uploader if u.label == label)


def enrol(at, person, photo):
    """Type the name, choose the photo, press "Add to gallery"."""
    at.text_input(key="enrol_name").input(person)
    uploader(at, "Their photo").set_value((*photo, "image/jpeg"))
    at.button(key="enrol").click().run()
    assert not at.exception, at.exception
    return at


def query(at, photo, mime="image/jpeg"):
    uploader(at, "Photo to identify").set_value((*photo, mime))
    at.run()
    assert not at.exception, at.exception
    return at


def answers(at):
    """The per-face verdict lines (success: known, info: unknown) and the match captions."""
    lines = [e.value for kind in ("success", "info") for e in getattr(at, kind)
             if e.value.startswith("Face ")]
    return lines, [c.value.replace("**", "") for c in at.caption
                   if c.value[:4] in {f"**{i}." for i in range(1, 6)}]


def assert_one_line_error(at, *parts):
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1, errors
    assert "\n" not in errors[0] and "Traceback" not in errors[0]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def test_identify_page_is_offered_beside_verification(monkeypatch, logs):
    assert [(file, title) for file, title, *_ in app.PAGES] == [
        (SAME_PERSON, "Same person?"), (WHO_IS_THIS, "Who is this?")]
    at = start(monkeypatch, logs)
    assert at.title[0].value == "Same person?"  # the default page
    at.sidebar.slider[0].set_value(-0.5).run()
    at = switch(at, WHO_IS_THIS)
    assert at.title[0].value == "Who is this?"
    # The sidebar is the frame's, not the page's: the threshold set on one page holds here.
    assert at.sidebar.selectbox[0].value == "compact-arcface-20250101-120000"
    assert at.sidebar.slider[0].value == pytest.approx(-0.5)
    # No LFW copy and no LFW_DEMO_GALLERY: people enrolled on the page are the gallery.
    assert at.radio(key="gallery_source").options == ["People I enrol here"]
    assert "Enrol at least one person" in at.info[0].value
    assert uploader(at, "Photo to identify").disabled  # nothing to search yet
    assert not at.error and not at.metric  # the verification page's parts are not drawn


def test_enrolled_people_identify_a_third_photo_and_the_threshold_makes_it_unknown(
        monkeypatch, logs, astronaut, cameraman, astronaut_again):
    at = identify_page(monkeypatch, logs)
    enrol(at, "Eileen Collins", ("astronaut.jpg", astronaut))
    enrol(at, "Cameraman", ("cameraman.jpg", cameraman))
    assert not at.error
    assert "Enrolled: Eileen Collins (1 photo), Cameraman (1 photo)" in texts(at)
    assert "Gallery: 2 people in 2 photos with a face (0 skipped)." in texts(at)
    assert at.text_input(key="enrol_name").value == ""  # ready for the next person

    query(at, ("astronaut_again.jpg", astronaut_again))
    lines, matches = answers(at)
    assert len(lines) == 1 and lines[0].startswith("Face 1: Eileen Collins (score ")
    assert lines[0].endswith("≥ threshold -0.300)") and at.success[0].value == lines[0]
    assert [m.split(":")[0] for m in matches] == ["1. Eileen Collins", "2. Cameraman"]
    score = float(matches[0].split(": ")[1])
    assert -0.3 < score < 0 and float(matches[1].split(": ")[1]) < -0.3
    # The query boxed, and each match shown by a thumbnail of their photo.
    assert [i.proto.imgs[0].caption for i in at.image[:1]] == ["astronaut_again.jpg"]
    assert len(at.image) == 3

    at.sidebar.slider[0].set_value(0.0).run()  # above her score: the same face is unknown
    lines, _ = answers(at)
    assert lines == [f"Face 1: unknown (best score {score:.3f}, Eileen Collins, is below the "
                     "threshold 0.000)"]
    assert not at.success


def test_a_face_nobody_enrolled_is_unknown_at_the_checkpoint_threshold(monkeypatch, logs,
                                                                       astronaut, cameraman):
    at = enrol(identify_page(monkeypatch, logs), "Eileen Collins", ("astronaut.jpg", astronaut))
    query(at, ("cameraman.jpg", cameraman))
    lines, matches = answers(at)
    assert len(lines) == 1 and lines[0].startswith("Face 1: unknown (best score -0.5")
    assert lines[0].endswith("Eileen Collins, is below the threshold -0.300)")
    assert [m.split(":")[0] for m in matches] == ["1. Eileen Collins"]


def test_gallery_folder_from_the_environment_is_embedded_once_and_cached(
        monkeypatch, logs, astronaut, cameraman, astronaut_again, tmp_path):
    gallery = tmp_path / "gallery"
    for person, photo in (("Eileen_Collins", astronaut), ("Cameraman", cameraman),
                          ("Nobody", jpeg(np.full((200, 200, 3), 128, dtype=np.uint8)))):
        (gallery / person).mkdir(parents=True)
        (gallery / person / "photo.jpg").write_bytes(photo)
    at = identify_page(monkeypatch, logs, gallery)
    assert at.radio(key="gallery_source").value == f"Folder {gallery}"  # the default
    assert ("Gallery: 2 people in 2 photos with a face (1 skipped); 3 photos embedded now, "
            "the others from the cache beside the photos.") in texts(at)
    assert at.expander[0].label == "1 gallery photo(s) left out"
    assert len(list(gallery.glob(".identify-cache-*.pt"))) == 1  # identify.py's cache

    query(at, ("astronaut_again.jpg", astronaut_again))
    lines, matches = answers(at)
    assert lines[0].startswith("Face 1: Eileen Collins (score ")  # LFW-style name, spaced
    assert [m.split(":")[0] for m in matches] == ["1. Eileen Collins", "2. Cameraman"]

    st_cache_resource_clear()  # a restarted server: the cache on disk answers
    at = identify_page(monkeypatch, logs, gallery)
    assert "; 0 photos embedded now" in texts(at)


def st_cache_resource_clear():
    import streamlit as st
    st.cache_resource.clear()


def test_app_embedding_leaves_identify_nothing_to_embed(monkeypatch, logs, astronaut,
                                                        tmp_path):
    """The page embeds a new folder through identify.load_gallery with a progress hook and
    the FaceModel it scores with, into identify.py's cache; a later load_gallery must then
    find every photo there and embed none."""
    (tmp_path / "g" / "Eileen_Collins").mkdir(parents=True)
    (tmp_path / "g" / "Eileen_Collins" / "a.jpg").write_bytes(astronaut)
    fm = FaceModel.load(logs / "compact-arcface-20250101-120000" / "best_accuracy.pt")
    files = identify.gallery_files(tmp_path / "g")
    state = identify.gallery_state(tmp_path / "g", files, fm)
    assert len(state[4]) == 1
    seen = []
    identify.load_gallery(tmp_path / "g", files, fm, state=state,
                          progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (1, 1)

    def embedded(*args, **kwargs):
        pytest.fail("re-embedded")
    monkeypatch.setattr(fm, "embed", embedded)
    monkeypatch.setattr(identify, "embed_faces", embedded, raising=False)
    gallery = identify.load_gallery(tmp_path / "g", files, fm)
    assert gallery.people == ["Eileen_Collins"] and gallery.n_new == 0


def test_identify_errors_are_one_line(monkeypatch, logs, astronaut, tmp_path):
    faceless = tmp_path / "faceless"
    (faceless / "Nobody").mkdir(parents=True)
    (faceless / "Nobody" / "wall.jpg").write_bytes(jpeg(np.full((200, 200, 3), 128, np.uint8)))
    at = identify_page(monkeypatch, logs, faceless)
    assert_one_line_error(at, "no face found in any of its 1 photos")
    assert uploader(at, "Photo to identify").disabled
    at = identify_page(monkeypatch, logs, tmp_path / "missing")
    assert_one_line_error(at, "no such gallery folder")

    at = identify_page(monkeypatch, logs)
    enrol(at, "Wall", ("wall.jpg", jpeg(np.full((200, 200, 3), 128, np.uint8))))
    assert_one_line_error(at, "wall.jpg: no face found")
    assert "Enrolled:" not in texts(at)  # a photo without a face is not enrolled
    enrol(at, "", ("astronaut.jpg", astronaut))
    assert_one_line_error(at, "Type the name of the person in astronaut.jpg first")

    enrol(at, "Eileen Collins", ("astronaut.jpg", astronaut))
    assert not at.error
    query(at, ("notes.txt", b"not a photo at all"), "text/plain")
    assert_one_line_error(at, "notes.txt: not a readable image")
    query(at, ("bomb.png", png_claiming(50_000, 50_000)), "image/png")
    assert_one_line_error(at, "bomb.png: 2,500 megapixels is over the 50 megapixel limit")
    query(at, ("wall.jpg", jpeg(np.full((200, 200, 3), 128, np.uint8))))
    assert_one_line_error(at, "wall.jpg: no face found")
    assert not answers(at)[0]


def test_the_lfw_copy_is_a_gallery_when_present(monkeypatch, logs, astronaut, cameraman,
                                                astronaut_again, tmp_path):
    data = tmp_path / "lfw"
    for person, photo in (("Eileen_Collins", astronaut), ("Cameraman", cameraman)):
        (data / "images" / person).mkdir(parents=True)
        (data / "images" / person / f"{person}_0001.jpg").write_bytes(photo)
    monkeypatch.delenv("LFW_DEMO_GALLERY", raising=False)
    at = switch(start(monkeypatch, logs, data), WHO_IS_THIS)
    assert at.radio(key="gallery_source").options == [f"LFW people ({data / 'images'})",
                                                      "People I enrol here"]
    assert "Gallery: 2 people in 2 photos with a face (0 skipped)" in texts(at)
    query(at, ("astronaut_again.jpg", astronaut_again))
    assert answers(at)[0][0].startswith("Face 1: Eileen Collins (score ")


# ------------------------------------------------------------------ through the one model object

@pytest.mark.skipif(not model.SHIPPED.is_file(), reason="no model is shipped in models/")
def test_both_pages_render_with_the_shipped_model(monkeypatch, tmp_path, astronaut):
    """No run of one's own: the shipped model answers on both pages, and says so."""
    monkeypatch.delenv("LFW_DEMO_GALLERY", raising=False)
    at = upload(start(monkeypatch, tmp_path), ("astronaut.jpg", astronaut),
                ("again.jpg", astronaut))
    assert not at.error, [e.value for e in at.error]
    assert at.info[0].value.startswith("Model: the shipped models/lfw-compact.pt")
    assert at.sidebar.selectbox[0].value == "shipped model"
    assert verdicts(at)["success"] == ["Verdict: Same person"]
    fm = FaceModel.load(model.SHIPPED)
    assert f"Aligned face the model sees ({fm.image_size}×{fm.image_size})" in [
        i.proto.imgs[0].caption for i in at.image]
    assert at.sidebar.slider[0].value == pytest.approx(fm.threshold, abs=1e-6)

    at = enrol(switch(at, WHO_IS_THIS), "Eileen Collins", ("astronaut.jpg", astronaut))
    assert at.title[0].value == "Who is this?"
    assert at.info[0].value.startswith("Model: the shipped models/lfw-compact.pt")
    query(at, ("astronaut.jpg", astronaut))
    assert not at.error, [e.value for e in at.error]
    assert at.success[0].value.startswith("Face 1: Eileen Collins (score ")


@pytest.mark.parametrize("which", ["fixture", "shipped"])
def test_same_person_score_is_the_face_models_score_of_the_two_faces(
        monkeypatch, logs, astronaut, cameraman, which):
    """The page's score is FaceModel.score_faces of the faces FaceModel.face finds, in the
    checkpoint's precision (the shipped model's is bf16), to 1e-5; the page shows it."""
    if which == "shipped" and not model.SHIPPED.is_file():
        pytest.skip("no model is shipped in models/")
    path = model.SHIPPED if which == "shipped" else \
        logs / "compact-arcface-20250101-120000" / "best_accuracy.pt"
    fm = FaceModel.load(path)
    want = fm.score_faces(fm.face(faces.decode(astronaut, "a"))[0],
                          fm.face(faces.decode(cameraman, "b"))[0])
    photos = [{"name": "astronaut.jpg", "data": astronaut},
              {"name": "cameraman.jpg", "data": cameraman}]
    got = same_person.pair_score(str(path), path.stat().st_mtime, *photos)
    assert got == pytest.approx(want, abs=1e-5)

    if which == "fixture":
        at = upload(start(monkeypatch, logs), ("astronaut.jpg", astronaut),
                    ("cameraman.jpg", cameraman))
    else:
        at = upload(start(monkeypatch, logs / "no-runs"), ("astronaut.jpg", astronaut),
                    ("cameraman.jpg", cameraman))
    assert {m.label: m.value for m in at.metric}["Score"] == f"{want:.3f}"
