import csv
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import decode_image, encode_jpeg, encode_png

import crop_dataset_to_faces as crop
import faces
from conftest import LFW_DIR, needs_lfw


def jpeg(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1),
                                 quality=95).numpy().tobytes())


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
    assert "no face" in rows["Nobody/Nobody_0001.jpg"] and "unreadable" in rows["Broken/Broken_0001.jpg"]
    out = capsys.readouterr().out
    assert "1 faces found, 1 centre-crop fallbacks, 1 unreadable" in out and "images/s" in out


def test_aligned_crop_puts_the_eyes_on_the_template(photos):
    """Detect again on the aligned crop: its landmarks must sit near the ArcFace template."""
    detector = faces.load_detector()
    img = faces.read_image(photos / "Eileen_Collins" / "Eileen_Collins_0001.jpg")
    crops, infos = faces.crop_faces(detector, [img], size=112)
    assert infos[0]["found"] and infos[0]["n_faces"] >= 1
    redetected = faces.detect(detector, [crops[0]])[0]
    assert redetected is not None
    err = np.abs(redetected[2][0] - faces.ARCFACE_TEMPLATE).max()
    assert err < 6, err  # pixels, in a 112 px crop


def test_resume_skips_done_files_and_overwrite_redoes_them(photos, tmp_path, capsys):
    dst = tmp_path / "out"
    crop.main(["--src", str(photos), "--dst", str(dst), "--workers", "1"])
    done = dst / "Eileen_Collins" / "Eileen_Collins_0001.jpg"
    done.write_bytes(b"marker")  # a resumed run must not touch finished crops
    capsys.readouterr()
    crop.main(["--src", str(photos), "--dst", str(dst), "--workers", "1"])
    assert done.read_bytes() == b"marker"
    assert "2 skipped (already cropped)" in capsys.readouterr().out
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


def test_pick_face_centre_or_largest():
    boxes = np.array([[0, 0, 100, 100], [90, 90, 160, 160]], dtype=float)
    assert faces.pick_face(boxes, 250, 250, "center") == 1
    assert faces.pick_face(boxes, 250, 250, "largest") == 0


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
        faces.decode_bytes(b"%PDF-1.4 hello")
    png = encode_png(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy().tobytes()
    assert faces.decode_bytes(png).shape == (3, 8, 8)


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
