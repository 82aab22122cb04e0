"""Shared fixtures: synthetic LFW-like folders (no face images are ever committed)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

torch.set_num_threads(2)

LFW_DIR = os.environ.get("LFW_DIR")
needs_lfw = pytest.mark.skipif(
    not LFW_DIR, reason="LFW_DIR not set: real-LFW tests need the archive and protocol files, "
                        "e.g. LFW_DIR=../shared/data/lfw (.ci/run sets it when ../shared exists)")


def write_people(image_dir, counts, size=48, seed=0):
    """<name>/<name>_NNNN.jpg images whose colour pattern depends on the person (a planted,
    learnable identity signal) plus per-image noise."""
    rng = np.random.default_rng(seed)
    image_dir = Path(image_dir)
    for k, (name, n) in enumerate(sorted(counts.items())):
        base = rng.integers(30, 225, size=(3, 4, 4))
        for i in range(1, n + 1):
            img = np.kron(base, np.ones((size // 4, size // 4))) + rng.normal(0, 12, (3, size, size))
            t = torch.from_numpy(img.clip(0, 255).astype(np.uint8))
            path = image_dir / name / f"{name}_{i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_jpeg(t, quality=95).numpy().tobytes())
    return image_dir


def write_jpeg(path, array):
    """A photo file of an (H, W, 3) or (H, W) uint8 array, its folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = torch.from_numpy(np.ascontiguousarray(array))
    t = t.permute(2, 0, 1) if t.ndim == 3 else t.expand(3, *t.shape)
    path.write_bytes(encode_jpeg(t.contiguous(), quality=95).numpy().tobytes())
    return path


def write_view1_protocol(root, train_counts, test_counts, n_test_pairs=20, seed=0):
    """peopleDevTrain.txt and pairsDevTest.txt (matched then mismatched) for synthetic people."""
    import random
    rng = random.Random(seed)
    root = Path(root)
    lines = [str(len(train_counts))] + [f"{n}\t{c}" for n, c in sorted(train_counts.items())]
    (root / "peopleDevTrain.txt").write_text("\n".join(lines) + "\n")
    multi = [n for n, c in sorted(test_counts.items()) if c >= 2]
    names = sorted(test_counts)
    matched = []
    for _ in range(n_test_pairs):
        n = rng.choice(multi)
        i, j = rng.sample(range(1, test_counts[n] + 1), 2)
        matched.append(f"{n}\t{i}\t{j}")
    mismatched = []
    for _ in range(n_test_pairs):
        a, b = rng.sample(names, 2)
        mismatched.append(f"{a}\t{rng.randint(1, test_counts[a])}\t{b}\t{rng.randint(1, test_counts[b])}")
    (root / "pairsDevTest.txt").write_text("\n".join([str(n_test_pairs)] + matched + mismatched) + "\n")


def small_lfw(root, n_train=12, n_test=4, test_images=3):
    """A synthetic LFW at root whose images folder is marked as face crops (crop_settings.json),
    as the crop script leaves one. Returns (train, test) {person: images}."""
    import faces
    train = {f"Train_Person_{k:02d}": 4 + k % 3 for k in range(n_train)}
    test = {f"Test_Person_{k:02d}": test_images for k in range(n_test)}
    write_people(root / "images", {**train, **test})
    write_view1_protocol(root, train, test)
    (root / "images" / faces.SETTINGS_FILE).write_text(json.dumps(faces.crop_settings()))
    return train, test


def two_face_photo(face):
    """A photo with the face and, beside it, a smaller copy of it: two faces, one prominent."""
    from skimage.transform import resize
    two = np.full((512, 768, 3), 200, np.uint8)
    two[:, :512] = face
    two[150:350, 540:740] = (resize(face, (200, 200)) * 255).astype(np.uint8)
    return two


def tiny_args(root, run_dir, **kw):
    """trainer2.py overrides for a seconds-long run on a synthetic LFW at root."""
    args = {"data_dir": root / "images", "protocol_dir": root, "image_size": 32, "epochs": 3,
            "batch_size": 16, "val_pairs": 40, "val_fraction": 0.25, "lr": 0.05,
            "embedding_dim": 32, "threads": 1, "run_name": run_dir, "warmup_epochs": 0,
            "max_minutes": 0, "torch_compile": False}  # compiling takes longer than these runs
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture
def synthetic_lfw(tmp_path):
    """A tiny LFW: 16 training people and 8 test people, images at root/images, protocol
    files at root. Returns the root."""
    train = {f"Train_Person_{k:02d}": 4 + k % 3 for k in range(16)}
    train["Single_Image"] = 1
    test = {f"Test_Person_{k:02d}": 3 + k % 2 for k in range(8)}
    write_people(tmp_path / "images", {**train, **test})
    write_view1_protocol(tmp_path, train, test)
    # As crop_dataset_to_faces.py leaves a crop folder: its settings travel into checkpoints.
    import faces
    (tmp_path / "images" / faces.SETTINGS_FILE).write_text(json.dumps(faces.crop_settings(size=48)))
    return tmp_path


@pytest.fixture(scope="session")
def lfw_root(tmp_path_factory):
    """Real LFW extracted once per session by download_data.py from $LFW_DIR (an LFW *.tgz plus
    the protocol files). Returns the root: root/images/<Name>/<Name>_NNNN.jpg, root/pairs.txt, ..."""
    lfw_dir = os.environ.get("LFW_DIR")
    if not lfw_dir:
        pytest.skip("LFW_DIR not set: real-LFW tests need the archive, e.g. LFW_DIR=../shared/data/lfw")
    archives = sorted(Path(lfw_dir).glob("*.tgz"))
    if not archives:
        pytest.fail(f"LFW_DIR={lfw_dir} holds no LFW *.tgz archive")
    import download_data
    root = tmp_path_factory.mktemp("lfw")
    rc = download_data.main(["--archive", str(archives[0]), "--protocol-dir", lfw_dir,
                             "--root", str(root)])
    assert rc == 0, "download_data.py failed on $LFW_DIR; see its error above"
    return root


def png_claiming(width, height):
    """The bytes of a tiny PNG whose header claims width x height: what a decompression bomb
    looks like to a header check, without allocating its pixels."""
    import io
    import struct
    import zlib

    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 4  # signature, then the IHDR chunk's length field
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def validation_data(split):
    """What training.validate reads of a run's data (training.build_data): the validation
    pairs and people, and every image of theirs decoded at 32 px (tiny_args' size)."""
    from types import SimpleNamespace
    import dataset as ds
    paths = {p for a, b, _ in split["val_pairs"] for p in (a, b)} | \
        {p for v in split["val"].values() for p in v}
    return SimpleNamespace(val_pairs=split["val_pairs"], val_people=split["val"],
                           bank=ds.ImageBank(paths, 32))
