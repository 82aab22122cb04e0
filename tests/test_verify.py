"""verify.py: verdicts and exit codes on a real face photo, its error lines, and the checkpoint
finders in model.py."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import faces
import model as m
import training
import trainer2
import verify
from conftest import small_lfw, tiny_args, two_face_photo
from conftest import write_jpeg as jpeg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny trained checkpoint and photos: the public-domain astronaut from scikit-image,
    the same photo with a second, smaller copy of her face beside it, and a blank image."""
    from skimage.data import astronaut
    root = tmp_path_factory.mktemp("verify")
    small_lfw(root)
    assert training.main(vars(trainer2), tiny_args(root, root / "run", epochs=1)) == 0
    face = astronaut()
    two = two_face_photo(face)
    return {"ckpt": root / "run" / "best_accuracy.pt",
            "face": jpeg(root / "astronaut.jpg", face),
            "two": jpeg(root / "two_faces.jpg", two),
            "blank": jpeg(root / "blank.jpg", np.full((250, 250, 3), 128, np.uint8))}


def run(capsys, *argv):
    code = verify.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_codes_follow_the_verdict(setup, capsys):
    s = setup
    code, out, _ = run(capsys, s["face"], s["face"], "--checkpoint", s["ckpt"], "--threshold", -1e9)
    assert code == 0 and out.startswith("same person: score") and "--threshold" in out
    code, out, _ = run(capsys, s["face"], s["face"], "--checkpoint", s["ckpt"], "--threshold", 1e9)
    assert code == 1 and out.startswith("different people: score")
    # The same photo twice scores a perfect cosine, above the checkpoint's own threshold.
    code, out, _ = run(capsys, s["face"], s["face"], "--checkpoint", s["ckpt"])
    threshold = torch.load(s["ckpt"], weights_only=True)["threshold"]
    assert code == 0 and f"threshold {threshold:.4f} (the checkpoint's validation threshold" in out


def test_json_output_has_every_field_and_warns_about_several_faces(setup, capsys):
    s = setup
    code, out, _ = run(capsys, s["face"], s["two"], "--checkpoint", s["ckpt"], "--threshold",
                       1e9, "--json")
    r = json.loads(out)
    assert code == 1 and r["verdict"] == "different people" and r["same"] is False
    assert isinstance(r["score"], float) and r["threshold"] == 1e9
    assert r["threshold_source"] == "--threshold" and r["checkpoint"] == str(s["ckpt"])
    assert r["images"] == [str(s["face"]), str(s["two"])] and r["faces_per_image"] == [1, 2]
    assert r["warnings"] == [f"{s['two']}: 2 faces found; used {faces.RULES['main']}"]
    assert r["crop_settings"] == faces.crop_settings() and r["boxes"][1][0] < 512


def test_no_face_and_unreadable_file_are_one_line_naming_the_file(setup, tmp_path, capsys):
    s = setup
    code, out, err = run(capsys, s["face"], s["blank"], "--checkpoint", s["ckpt"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {s['blank']}: no face found")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = run(capsys, broken, s["face"], "--checkpoint", s["ckpt"])
    assert code == 2 and err.startswith(f"error: {broken}: not a readable image")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, s["face"], s["face"], "--checkpoint", tmp_path / "none.pt")
    assert code == 2 and "none.pt: no such checkpoint" in err and len(err.strip().splitlines()) == 1


def test_no_checkpoint_under_logs_says_how_to_train(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(m, "SHIPPED", tmp_path / "no-shipped-model.pt")  # a clone without one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    code, _, err = run(capsys, setup["face"], setup["face"])
    assert code == 2 and "make train" in err and "python trainer2.py" in err
    assert len(err.strip().splitlines()) == 1


def test_newest_checkpoint_and_list_checkpoints(setup, tmp_path, capsys, monkeypatch):
    logs = tmp_path / "logs"
    assert m.newest_checkpoint(logs) is None and m.list_checkpoints(logs) == []
    for run_name, when in (("old", 1_000_000), ("new", 2_000_000), ("middle", 1_500_000)):
        (logs / run_name).mkdir(parents=True)
        for name in ("best_accuracy.pt", "best_auc.pt"):
            shutil.copy(setup["ckpt"], logs / run_name / name)
            os.utime(logs / run_name / name, (when, when))
    (logs / "new" / "best_loss.pt").write_bytes(b"half-written")  # left out, not a crash
    assert m.newest_checkpoint(logs) == logs / "new" / "best_accuracy.pt"
    rows = m.list_checkpoints(logs)
    assert len(rows) == 6 and [r["run"] for r in rows[::2]] == ["new", "middle", "old"]
    saved = torch.load(setup["ckpt"], weights_only=True)
    r = rows[0]
    assert r["model"] == "compact" and r["loss"] == saved["model_config"]["loss"]
    assert r["accuracy"] == saved["metrics"]["accuracy"] and r["threshold"] == saved["threshold"]
    assert r["mtime"] == 2_000_000 and r["best"] in ("accuracy", "auc")
    # verify.py without --checkpoint uses the newest.
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, setup["face"], setup["face"], "--threshold", -1e9, "--json")
    assert code == 0 and json.loads(out)["checkpoint"] == "logs/new/best_accuracy.pt"


def test_any_other_failure_is_exit_2_never_a_verdict(setup, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("detector weights unreadable")
    monkeypatch.setattr(faces, "detector_for", broken)
    code, out, err = run(capsys, setup["face"], setup["face"], "--checkpoint", setup["ckpt"])
    assert code == 2 and out == "" and "RuntimeError: detector weights unreadable" in err


def test_a_model_without_crop_settings_is_refused(setup, tmp_path, capsys):
    ckpt = torch.load(setup["ckpt"], weights_only=True)
    ckpt["crop"] = None  # trained on a folder without crop_settings.json, as trainer.py's photos
    torch.save(ckpt, tmp_path / "photos.pt")
    code, _, err = run(capsys, setup["face"], setup["face"], "--checkpoint", tmp_path / "photos.pt")
    assert code == 2 and "holds no crop_settings.json" in err and "crop_dataset_to_faces.py" in err
    assert len(err.strip().splitlines()) == 1


def test_a_bbox_model_gets_bbox_faces(setup, tmp_path, capsys):
    ckpt = torch.load(setup["ckpt"], weights_only=True)
    ckpt["crop"] = faces.crop_settings(mode="bbox", size=96, margin=4)
    torch.save(ckpt, tmp_path / "bbox.pt")
    code, out, _ = run(capsys, setup["face"], setup["face"], "--checkpoint", tmp_path / "bbox.pt",
                       "--threshold", -1e9)
    assert code == 0 and "faces: bbox crops of 96 px" in out


def test_an_oversized_photo_is_refused_from_its_header(setup, tmp_path, capsys, monkeypatch):
    from conftest import png_claiming
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(12000, 12000))  # 144 MP: 83 s and 8.7 GB to decode and detect

    def never(*a, **k):
        raise AssertionError("an oversized photo was decoded")
    monkeypatch.setattr(faces, "decode_image", never)
    code, out, err = run(capsys, huge, setup["face"], "--checkpoint", setup["ckpt"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {huge}: 144 megapixels is over the 50 megapixel limit")


# ------------------------------------------------------------------ thresholds by FAR

def test_far_picks_the_stored_threshold_and_says_what_it_means(setup, capsys):
    s = setup
    point = torch.load(s["ckpt"], weights_only=True)["operating_points"]["points"]["0.01"]
    code, out, _ = run(capsys, s["face"], s["face"], "--checkpoint", s["ckpt"], "--far", "1e-2")
    assert code == 0
    assert f"threshold {point['threshold']:.4f} (the checkpoint's threshold for FAR 0.01;" in out
    assert "about 1 in 100 different-person pairs score at or above" in out
    code, out, _ = run(capsys, s["face"], s["face"], "--checkpoint", s["ckpt"], "--far", "0.01",
                       "--json")
    r = json.loads(out)
    assert (r["threshold"], r["threshold_source"], r["far"]) == (point["threshold"], "--far", 0.01)
    assert r["threshold_meaning"].startswith("on 3 validation people")
    # --threshold wins over --far.
    code, out, _ = run(capsys, s["face"], s["face"], "--checkpoint", s["ckpt"], "--far", "0.01",
                       "--threshold", 1e9)
    assert code == 1 and "(--threshold;" in out


def older(saved, path, *keys):
    saved = {k: v for k, v in saved.items() if k not in keys}
    torch.save(saved, path)
    return path


def test_an_older_checkpoint_or_a_bad_rate_is_one_line(setup, capsys, tmp_path):
    s = setup
    old = older(torch.load(s["ckpt"], weights_only=True), tmp_path / "old.pt",
                "operating_points")
    code, out, err = run(capsys, s["face"], s["face"], "--checkpoint", old, "--far", "1e-3")
    assert code == 2 and not out and err.count("\n") == 1
    assert f"{old}: has no false-accept thresholds" in err and \
        f"python calibrate.py {old}" in err
    code, _, err = run(capsys, s["face"], s["face"], "--checkpoint", old)  # the default still works
    assert code == 0
    for rate, why in (("5", "between 0 and 1"), ("nan", "between 0 and 1"),
                      ("0.05", "no threshold for FAR 0.05; it has 0.01, 0.001, 0.0001")):
        code, out, err = run(capsys, s["face"], s["face"], "--checkpoint", s["ckpt"], "--far", rate)
        assert code == 2 and why in err and err.count("\n") == 1, (rate, err)


@pytest.mark.parametrize("drop", [("operating_points",), ("operating_points", "val_people")])
def test_calibrate_gives_an_older_checkpoint_the_thresholds_training_records(setup, tmp_path,
                                                                             drop):
    import calibrate
    saved = torch.load(setup["ckpt"], weights_only=True)
    old = older(saved, tmp_path / "old.pt", *drop)  # without val_people: from its split
    assert calibrate.main([str(old)]) == 0
    now = torch.load(old, weights_only=True)
    assert now["val_people"] == saved["val_people"]
    want, got = saved["operating_points"], now["operating_points"]
    assert (got["n_same"], got["n_different"]) == (want["n_same"], want["n_different"])
    for key, point in want["points"].items():
        assert got["points"][key]["threshold"] == pytest.approx(point["threshold"], abs=1e-5)
    assert torch.equal(now["model"]["backbone.head.4.weight"],
                       saved["model"]["backbone.head.4.weight"])  # nothing else changed


def test_calibrate_refuses_a_checkpoint_whose_split_it_cannot_rebuild(setup, tmp_path, capsys):
    import calibrate
    saved = torch.load(setup["ckpt"], weights_only=True)
    saved["train_people"] = saved["train_people"][1:]  # not what its split settings give
    old = older(saved, tmp_path / "old.pt", "operating_points", "val_people")
    before = old.read_bytes()
    assert calibrate.main([str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its validation people are unknown" in err
    assert old.read_bytes() == before
