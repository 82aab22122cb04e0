import csv
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, encode_png

import crop_dataset_to_faces as crop
import faces
from conftest import LFW_DIR, needs_lfw
from conftest import write_jpeg as jpeg


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A real face (public-domain astronaut photo from scikit-image), a blank image and an
    unreadable file, in the <person>/<image> layout."""
    from skimage.data import astronaut
    src = tmp_path_factory.mktemp("src")
    jpeg(src / "Eileen_Collins" / "Eileen_Collins_0001.jpg", astronaut())
    jpeg(src / "Nobody" / "Nobody_0001.jpg", np.full((250, 250, 3), 128, np.uint8))
    (src / "Broken" ).mkdir()
    (src / "Broken" / "Broken_0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return src


def report(dst):
    with open(dst / "report.csv", newline="") as f:
        return {r["file"]: r["reason"] for r in csv.DictReader(f)}


def test_crop_finds_the_face_falls_back_on_blank_and_reports(photos, tmp_path, capsys):
    dst = tmp_path / "out"
    assert crop.main(["--src", str(photos), "--dst", str(dst), "--workers", "1"]) == 0
    face = decode_image(str(dst / "Eileen_Collins" / "Eileen_Collins_0001.jpg"))
    blank = decode_image(str(dst / "Nobody" / "Nobody_0001.jpg"))
    assert face.shape == blank.shape == (3, 112, 112)
    assert not (dst / "Broken" / "Broken_0001.jpg").exists()
    rows = report(dst)
    assert set(rows) == {"Nobody/Nobody_0001.jpg", "Broken/Broken_0001.jpg"}
    assert "no face" in rows["Nobody/Nobody_0001.jpg"]
    assert "not a readable image" in rows["Broken/Broken_0001.jpg"]
    out = capsys.readouterr().out
    assert "1 faces found, 1 centre-crop fallbacks, 1 skipped" in out and "images/s" in out
    assert json.loads((dst / "crop_settings.json").read_text()) == faces.CROP_DEFAULTS


def test_aligned_crop_puts_the_eyes_on_the_template(photos):
    """Detect again on the aligned crop: its landmarks must sit near the ArcFace template."""
    settings = faces.crop_settings()
    detector = faces.detector_for(settings)
    img = faces.read_image(photos / "Eileen_Collins" / "Eileen_Collins_0001.jpg")
    crops, infos = faces.crop_faces(detector, [img], settings)
    assert infos[0]["found"] and infos[0]["n_faces"] >= 1
    # the crop's face is ~60 px: a finer pyramid than the crops' min_face=40 places landmarks
    redetected = faces.detect(faces.detector_for(faces.crop_settings(min_face=20)), [crops[0]])[0]
    assert redetected is not None
    err = np.abs(redetected[2][0] - faces.ARCFACE_TEMPLATE).max()
    # pixels in a 112 px crop; the crops' min_face=40 skips the finest pyramid levels, which
    # costs landmark precision (6.9 px here, under 6 at min_face=20)
    assert err < 8, err


def test_resume_skips_done_files_and_overwrite_redoes_them(photos, tmp_path, capsys):
    dst = tmp_path / "out"
    crop.main(["--src", str(photos), "--dst", str(dst), "--workers", "1"])
    done = dst / "Eileen_Collins" / "Eileen_Collins_0001.jpg"
    done.write_bytes(b"marker")  # a resumed run must not touch finished crops
    capsys.readouterr()
    crop.main(["--src", str(photos), "--dst", str(dst), "--workers", "1"])
    assert done.read_bytes() == b"marker"
    assert "2 already cropped" in capsys.readouterr().out
    assert "Nobody/Nobody_0001.jpg" in report(dst)  # earlier report rows survive a resume
    crop.main(["--src", str(photos), "--dst", str(dst), "--workers", "1", "--overwrite"])
    assert done.read_bytes() != b"marker"


def test_bbox_mode_and_size(photos, tmp_path):
    dst = tmp_path / "out"
    crop.main(["--src", str(photos), "--dst", str(dst), "--mode", "bbox", "--size", "64",
               "--workers", "1"])
    assert decode_image(str(dst / "Eileen_Collins" / "Eileen_Collins_0001.jpg")).shape == (3, 64, 64)


@pytest.mark.parametrize("make", [lambda d: None, lambda d: d.mkdir()])
def test_missing_or_empty_source_is_a_clear_error(tmp_path, make):
    src = tmp_path / "images"
    make(src)
    with pytest.raises(SystemExit, match=r"images: no.*download_data.py"):
        crop.main(["--src", str(src), "--dst", str(tmp_path / "out")])


def test_pick_face_centre_or_main():
    boxes = np.array([[0, 0, 100, 100], [90, 90, 160, 160]], dtype=float)
    assert faces.pick_face(boxes, [1, 1], 250, 250, "center") == 1
    assert faces.pick_face(boxes, [1, 1], 250, 250, "main") == 0  # whole and larger
    assert faces.pick_face(boxes, [0.2, 1], 250, 250, "main") == 1  # the detector doubts it


def test_a_bystander_cut_by_the_edge_loses_to_the_subject():
    """George_W_Bush_0020.jpg: the bystander's box (-94, 49, 37, 193) is mostly outside the
    250 px photo; unclipped it outsizes Bush's (18,910 against 11,301 px2)."""
    bush = [75, 70, 176, 182]  # 101 x 112 = 11,312 px2, near the centre
    boxes = np.array([[-94, 49, 37, 193], bush], dtype=float)
    assert faces.pick_face(boxes, [0.99, 0.99], 250, 250, "main") == 1


def compose_two_faces():
    """A 500x700 photo: the astronaut's face enlarged and cut by the left edge, and the same
    face whole and smaller right of the centre."""
    import torch.nn.functional as F
    from skimage.data import astronaut
    face = torch.from_numpy(astronaut()).permute(2, 0, 1)[:, 40:300, 120:380]

    def resize(side):
        return F.interpolate(face[None].float(), size=(side, side), mode="bilinear",
                             antialias=True)[0].round().byte()
    photo = torch.full((3, 500, 700), 128, dtype=torch.uint8)
    photo[:, :, :340] = resize(520)[:, :500, 180:]
    photo[:, 120:380, 380:640] = resize(260)
    return photo


def test_uploads_use_the_whole_central_face_not_a_larger_cut_one():
    settings = faces.crop_settings(min_face=20)
    photo = compose_two_faces()
    boxes = faces.detect(faces.detector_for(settings), [photo])[0][0]
    assert len(boxes) == 2 and boxes[:, 0].min() < -50  # both found, one far past the edge
    cut = int(np.argmin(boxes[:, 0]))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert area[cut] > area[1 - cut]  # the rule that compared unclipped areas picked it
    _, info = faces.face_for_model(faces.detector_for(settings), photo, settings)
    assert info["box"][0] > 300 and info["n_faces"] == 2 and "most prominent" in info["rule_text"]


def test_similarity_transform_recovers_a_known_transform():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = faces.ARCFACE_TEMPLATE
    m = faces.similarity_transform(src, src @ (scale * rot).T + shift)
    assert np.allclose(m, np.hstack([scale * rot, shift[:, None]]))


def test_warp_with_identity_box_keeps_the_image():
    img = torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8)
    out = faces.warp([img], [faces.box_matrix((0, 0, 32, 32), 32, 0)], 32)
    assert torch.equal(out[0], img)


def test_unreadable_upload_bytes_are_a_face_error():
    with pytest.raises(faces.FaceError, match="upload: not a readable image"):
        faces.decode(b"%PDF-1.4 hello")
    png = encode_png(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy().tobytes()
    assert faces.decode(png).shape == (3, 8, 8)


@needs_lfw
def test_real_lfw_faces_are_found(tmp_path, capsys):
    """Crop 50 real LFW images straight from the archive: MTCNN must find (nearly) all."""
    archive = next(Path(LFW_DIR).glob("*.tgz"))
    src = tmp_path / "images"
    with tarfile.open(archive) as tar:
        n = 0
        for m in tar:
            if m.isfile() and m.name.endswith(".jpg"):
                person, name = m.name.split("/")[-2:]
                (src / person).mkdir(parents=True, exist_ok=True)
                (src / person / name).write_bytes(tar.extractfile(m).read())
                n += 1
                if n == 50:
                    break
    crop.main(["--src", str(src), "--dst", str(tmp_path / "out")])
    found = int(capsys.readouterr().out.split(" faces found")[0].rsplit(" ", 1)[1])
    assert found >= 49, found
    assert len(list((tmp_path / "out").rglob("*.jpg"))) == 50


def test_a_kill_during_cropping_loses_no_report_row(photos, tmp_path):
    """kill -9 on the second crop of three no-face photos, then the same command again: the
    report must list all three fallbacks, as an uninterrupted run does."""
    src = tmp_path / "src"
    jpeg(src / "Eileen_Collins" / "Eileen_Collins_0001.jpg",
         decode_image(str(photos / "Eileen_Collins" / "Eileen_Collins_0001.jpg")).permute(1, 2, 0).numpy())
    for i in (1, 2, 3):
        jpeg(src / "Blank" / f"Blank_000{i}.jpg", np.full((250, 250, 3), 128, np.uint8))
    dst = tmp_path / "out"
    args = ["--src", str(src), "--dst", str(dst), "--workers", "1"]
    dying = (
        "import os, signal, sys\n"
        "import crop_dataset_to_faces as crop\n"
        "real, n = crop.write_atomic, [0]\n"
        "def write(path, *a, **k):\n"
        "    if str(path).endswith('.jpg'):\n"
        "        n[0] += 1\n"
        "        if n[0] == 2:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, *a, **k)\n"
        "crop.write_atomic = write\n"
        "crop.main(sys.argv[1:])\n")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", dying, *args], cwd=root, capture_output=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-500:]
    assert (dst / "Blank" / "Blank_0001.jpg").exists()
    assert not (dst / "Blank" / "Blank_0002.jpg").exists()
    assert crop.main(args) == 0
    assert set(report(dst)) == {f"Blank/Blank_000{i}.jpg" for i in (1, 2, 3)}


def test_an_oversized_image_is_skipped_from_its_header_and_listed(photos, tmp_path, monkeypatch):
    from conftest import png_claiming
    src = tmp_path / "src"
    for person in ("Eileen_Collins", "Nobody"):
        (src / person).mkdir(parents=True)
        for f in (photos / person).iterdir():
            (src / person / f.name).write_bytes(f.read_bytes())
    bomb = png_claiming(50000, 50000)
    (src / "Huge").mkdir()
    (src / "Huge" / "Huge_0001.png").write_bytes(bomb)
    real = faces.decode_image

    def decode_image(data, *a, **k):  # what decoding 2.5 gigapixels does to a real machine
        if bytes(data.numpy()) == bomb:
            raise MemoryError("2.5 gigapixels")
        return real(data, *a, **k)
    monkeypatch.setattr(faces, "decode_image", decode_image)
    dst = tmp_path / "out"
    assert crop.main(["--src", str(src), "--dst", str(dst), "--workers", "1"]) == 0
    assert (dst / "Eileen_Collins" / "Eileen_Collins_0001.jpg").exists()
    assert (dst / "Nobody" / "Nobody_0001.jpg").exists()
    reason = report(dst)["Huge/Huge_0001.png"]
    assert "Huge_0001.png" in reason and "2,500 megapixels is over the 50 megapixel limit" in reason


def test_person_folders_that_are_links_are_followed(photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for person in ("Eileen_Collins", "Nobody"):
        os.symlink(photos / person, src / person, target_is_directory=True)
    dst = tmp_path / "out"
    assert crop.main(["--src", str(src), "--dst", str(dst), "--workers", "1"]) == 0
    assert sorted(p.name for p in dst.rglob("*.jpg")) == ["Eileen_Collins_0001.jpg", "Nobody_0001.jpg"]


def test_crops_of_other_settings_are_never_mixed(photos, tmp_path):
    dst = tmp_path / "out"
    args = ["--src", str(photos), "--dst", str(dst), "--workers", "1"]
    assert crop.main(args) == 0
    with pytest.raises(SystemExit, match="holds crops made with other settings.*--overwrite"):
        crop.main(args + ["--mode", "bbox"])
    assert json.loads((dst / "crop_settings.json").read_text())["mode"] == "align"
    (dst / "crop_settings.json").unlink()  # crops from before settings were recorded
    with pytest.raises(SystemExit, match="without a crop_settings.json"):
        crop.main(args)
    assert crop.main(args + ["--mode", "bbox", "--overwrite"]) == 0
    assert json.loads((dst / "crop_settings.json").read_text())["mode"] == "bbox"
