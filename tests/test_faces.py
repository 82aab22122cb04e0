"""One path from photo to network input: the crop script then the training loader give the
same tensor as the verify path, and every reader decodes alike (EXIF orientation included)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import crop_dataset_to_faces as crop
import dataset as ds
import faces


@pytest.fixture(scope="module")
def astronaut_jpeg(tmp_path_factory):
    from skimage.data import astronaut
    src = tmp_path_factory.mktemp("src")
    path = src / "Eileen_Collins" / "Eileen_Collins_0001.jpg"
    path.parent.mkdir()
    Image.fromarray(astronaut()).save(path, quality=95)
    return src, path


@pytest.mark.parametrize("mode", ["align", "bbox"])
def test_crop_then_loader_equals_the_verify_path(astronaut_jpeg, tmp_path, mode):
    src, photo = astronaut_jpeg
    dst = tmp_path / "crops"
    assert crop.main(["--src", str(src), "--dst", str(dst), "--mode", mode, "--workers", "1"]) == 0
    settings = faces.read_crop_settings(dst)
    assert settings["mode"] == mode and json.loads((dst / faces.SETTINGS_FILE).read_text()) == settings
    size = 112
    transform = ds.eval_transform()
    # Training: the crop file through the image bank the loader reads.
    bank = ds.ImageBank([dst / "Eileen_Collins" / "Eileen_Collins_0001.jpg"], size)
    trained_on = transform(bank[dst / "Eileen_Collins" / "Eileen_Collins_0001.jpg"])
    # verify.py and the app: the photo through face_for_model with the folder's settings.
    face, info = faces.face_for_model(faces.detector_for(settings), faces.read_image(photo),
                                      settings)
    verified = transform(ds.fit(face, size))
    assert info["n_faces"] == 1 and trained_on.shape == verified.shape == (3, size, size)
    # JPEG tolerance: one uint8 level is 1/255/std ~ 0.017 after normalisation.
    assert (trained_on - verified).abs().max() <= 2 * 0.0175


def exif_rotated_jpeg(array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_every_reader_applies_exif_orientation(tmp_path):
    """A phone photo stored sideways with orientation 6 (rotate 90 clockwise to view)."""
    array = np.zeros((40, 60, 3), np.uint8)
    array[:, :10] = 255  # a white band on the stored image's left
    data = exif_rotated_jpeg(array, 6)
    path = tmp_path / "P" / "P_0001.jpg"
    path.parent.mkdir()
    path.write_bytes(data)
    upright = faces.decode(data)
    assert upright.shape == (3, 60, 40)
    assert upright[:, :10].float().mean() > 200  # the band is now on top
    assert torch.equal(faces.read_image(path), upright)
    assert torch.equal(ds.load_image(path), upright)  # the training loader too


def test_a_corrupt_training_image_is_named_with_the_fix(tmp_path):
    bad = tmp_path / "P" / "P_0001.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ds.ProtocolError, match=r"P_0001.jpg: not a readable image.*"
                                               r"crop_dataset_to_faces.py --overwrite"):
        ds.ImageBank([bad], 32)


def test_decode_errors_carry_no_cpp_paths(tmp_path):
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(jpeg, format="JPEG")
    cut = jpeg.getvalue()[:-10]  # a header PIL reads, with the pixel data cut off
    with pytest.raises(faces.FaceError) as e:
        faces.decode(cut, "cut.jpg")
    message = str(e.value)
    assert message.startswith("cut.jpg: cannot decode it (Image is incomplete or truncated")
    assert ".cpp" not in message and "/__w/" not in message and "\n" not in message
