"""pairs.py: LFW, CSV and insightface .bin pair readers, the safe unpickler, and images_of."""
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold

import dataset as ds
import pairs as pr
from conftest import LFW_DIR, needs_lfw, write_people

PEOPLE = {"Ann_A": 3, "Bob_B": 2, "Cid_C": 1, "Dee_D": 2}


@pytest.fixture
def folder(tmp_path):
    """Synthetic <person>/<image>.jpg images and a few pairs of them (with folds)."""
    write_people(tmp_path / "images", PEOPLE, size=32)
    img = lambda name, k: tmp_path / "images" / name / f"{name}_{k:04d}.jpg"
    pairs = [pr.Pair(img("Ann_A", 1), img("Ann_A", 2), 1, 0),
             pr.Pair(img("Bob_B", 1), img("Cid_C", 1), 0, 0),
             pr.Pair(img("Dee_D", 1), img("Dee_D", 2), 1, 1),
             pr.Pair(img("Ann_A", 3), img("Dee_D", 2), 0, 1)]
    return tmp_path, pairs


# ------------------------------------------------------------------ CSV

def test_csv_round_trip_relative_to_its_folder(folder):
    tmp, pairs = folder
    path = tmp / "pairs.csv"
    pr.write_csv(path, pairs)
    text = path.read_text()
    assert text.splitlines()[0] == "path_a,path_b,same,fold"
    assert "images/Ann_A/Ann_A_0001.jpg,images/Ann_A/Ann_A_0002.jpg,1,0" in text  # relative
    got, images = pr.read_pairs(path)
    assert images is None and got == pairs and all(isinstance(p, pr.Pair) for p in got)
    assert not list(tmp.glob("*.tmp"))  # the atomic write left no temporary behind


def test_csv_without_folds_and_relative_to_a_root(folder, tmp_path):
    tmp, pairs = folder
    triples = [p[:3] for p in pairs]  # what dataset.sample_pairs gives a random split
    path = tmp / "run" / "test_pairs.csv"
    pr.write_csv(path, triples, root=tmp / "images")
    assert path.read_text().splitlines()[:2] == [
        "path_a,path_b,same", "Ann_A/Ann_A_0001.jpg,Ann_A/Ann_A_0002.jpg,1"]
    got = pr.read_csv(path, image_dir=tmp / "images")
    assert [p[:3] for p in got] == triples and {p.fold for p in got} == {None}


def test_csv_outside_root_is_absolute(folder, tmp_path_factory):
    _, pairs = folder
    path = tmp_path_factory.mktemp("elsewhere") / "pairs.csv"
    pr.write_csv(path, pairs)
    assert path.read_text().splitlines()[1].startswith(str(pairs[0].path_a.absolute()))
    assert pr.read_csv(path) == pairs


def test_write_csv_refuses_mixed_folds(folder):
    tmp, pairs = folder
    with pytest.raises(ValueError, match="some pairs have a fold"):
        pr.write_csv(tmp / "x.csv", [pairs[0], pairs[1][:3]])
    assert not (tmp / "x.csv").exists()


@pytest.mark.parametrize("text, line, what", [
    ("", 1, "empty file"),
    ("path_a,path_b,same\n", 2, "no pairs after the header"),
    ("path_a,path_b\na.jpg,b.jpg\n", 1, "no 'same' column"),
    ("path_a,path_b,same,flod\na.jpg,b.jpg,1,0\n", 1, "unknown column 'flod'"),
    ("path_a,path_b,same,same\na.jpg,b.jpg,1,1\n", 1, "a column named twice"),
    ("path_a,path_b,same\na.jpg,b.jpg,1\na.jpg,c.jpg,yes\n", 3, "same must be 0 or 1, got 'yes'"),
    ("path_a,path_b,same\na.jpg,b.jpg,2\n", 2, "same must be 0 or 1"),
    ("path_a,path_b,same\na.jpg,b.jpg,1\n\na.jpg,0\n", 4, "2 fields where the header has 3"),
    ("path_a,path_b,same\na.jpg,b.jpg,1,7\n", 2, "4 fields where the header has 3"),
    ("path_a,path_b,same,fold\na.jpg,b.jpg,1,one\n", 2, "fold must be a whole number, got 'one'"),
    ("path_a,path_b,same,fold\na.jpg,b.jpg,1,-1\n", 2, "fold must be a whole number"),
    ("path_a,path_b,same,fold\na.jpg,b.jpg,1,\n", 2, "fold must be a whole number, got ''"),
    ("path_a,path_b,same\n,b.jpg,1\n", 2, "an empty image path"),
])
def test_malformed_csv_is_one_line_naming_file_line_and_fix(tmp_path, text, line, what):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ds.ProtocolError) as e:
        pr.read_pairs(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: ") and what in msg and "\n" not in msg
    assert msg.endswith(pr.CSV_FIX)


def test_csv_not_utf8_or_absent(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"path_a,path_b,same\n\xe9.jpg,b.jpg,1\n")
    with pytest.raises(ds.ProtocolError, match=r"latin\.csv: not UTF-8 text \(byte 0xe9"):
        pr.read_pairs(path)
    with pytest.raises(ds.ProtocolError, match="no such file"):
        pr.read_pairs(tmp_path / "absent.csv")


def test_csv_with_excel_bom_and_spaces(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffpath_a, path_b, same\nx/a.jpg, x/b.jpg, 1\n".encode())
    assert pr.read_pairs(path, image_dir="/data")[0] == [
        pr.Pair(Path("/data/x/a.jpg"), Path("/data/x/b.jpg"), 1, None)]


# ------------------------------------------------------------------ LFW files

def test_lfw_view1_matches_parse_pairs(synthetic_lfw):
    path, images = synthetic_lfw / "pairsDevTest.txt", synthetic_lfw / "images"
    got, none = pr.read_pairs(path, images)
    want = ds.pairs_to_paths(ds.parse_pairs(path), images)
    assert none is None and [p[:3] for p in got] == want
    assert {p.fold for p in got} == {None}  # one set: evaluate cuts balanced folds


def test_lfw_view2_keeps_official_folds(tmp_path):
    write_people(tmp_path / "images", PEOPLE, size=16)
    (tmp_path / "pairs.txt").write_text("2\t1\nAnn_A\t1\t2\nBob_B\t1\tCid_C\t1\n"
                                        "Dee_D\t1\t2\nAnn_A\t3\tDee_D\t2\n")
    got, _ = pr.read_pairs(tmp_path / "pairs.txt", tmp_path / "images")
    assert [(p.same, p.fold) for p in got] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert got[3].path_b == tmp_path / "images" / "Dee_D" / "Dee_D_0002.jpg"
    assert not pr.missing_images(got)


def test_lfw_file_needs_an_image_folder(synthetic_lfw):
    with pytest.raises(ds.ProtocolError, match="names people, not files"):
        pr.read_pairs(synthetic_lfw / "pairsDevTest.txt")


# ------------------------------------------------------------------ insightface .bin

def bins_of(pairs):
    return [Path(p).read_bytes() for pair in pairs for p in pair[:2]]


def test_bin_reads_back_and_decodes_as_the_csv(folder):
    tmp, pairs = folder
    pr.write_bin(tmp / "x.bin", bins_of(pairs), [p.same for p in pairs])
    bins, labels = pickle.load(open(tmp / "x.bin", "rb"), encoding="bytes")  # insightface's way
    assert bins == bins_of(pairs) and labels == [True, False, True, False]
    got, images = pr.read_pairs(tmp / "x.bin")
    assert [p.path_a for p in got] == [Path(f"{tmp / 'x.bin'}#{2 * i}") for i in range(4)]
    assert [p.same for p in got] == [p.same for p in pairs]
    assert set(images) == {q for p in got for q in p[:2]} and not pr.missing_images(got, images)
    pr.write_csv(tmp / "x.csv", pairs)
    csv_pairs, none = pr.read_pairs(tmp / "x.csv")
    for size in (32, 24):
        from_bin = pr.images_of_for(images, size)([q for p in got for q in p[:2]])
        from_csv = pr.images_of_for(none, size)([q for p in csv_pairs for q in p[:2]])
        assert from_bin.dtype == torch.uint8 and from_bin.shape == (8, 3, size, size)
        assert torch.equal(from_bin, from_csv)
    assert pr.people_of(csv_pairs) == set(PEOPLE) and pr.people_of(got, images) is None


def test_bin_folds_are_insightface_kfold():
    for n in (6000, 1000, 13, 7):
        folds = np.array(pr.consecutive_folds(n))
        want = np.empty(n, int)
        for k, (_, test) in enumerate(KFold(n_splits=min(10, n), shuffle=False).split(range(n))):
            want[test] = k
        assert (folds == want).all()


def test_bin_with_numpy_labels_and_python2_strings(folder):
    tmp, pairs = folder
    labels = np.array([p.same for p in pairs], dtype=bool)
    (tmp / "np.bin").write_bytes(pickle.dumps((bins_of(pairs), labels), protocol=4))
    got, _ = pr.read_pairs(tmp / "np.bin")
    assert [p.same for p in got] == [1, 0, 1, 0]
    # Python 2 wrote images as str: protocol 2's SHORT_BINSTRING, which loads as bytes
    py2 = b"\x80\x02]q\x00(U\x03abcq\x01U\x03defq\x02e]q\x03\x88a\x86q\x04."
    (tmp / "py2.bin").write_bytes(py2)
    bins, labels = pr.load_bin(tmp / "py2.bin")
    assert bins == [b"abc", b"def"] and labels == [1]


class RunsCode:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "numpy-object-array"])
def test_bin_with_code_is_refused_without_running_it(folder, how):
    import builtins
    tmp, pairs = folder
    marker = tmp / "ran"
    payload = RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()") \
        if how == "builtins.exec" else RunsCode(os.system, f"touch {marker}")
    if how == "numpy-object-array":  # numpy's rebuilders are allowed; what they hold is not
        payload = np.array([payload], dtype=object)
    (tmp / "evil.bin").write_bytes(pickle.dumps((bins_of(pairs), [payload] * 4), protocol=4))
    with pytest.raises(ds.ProtocolError) as e:
        pr.read_pairs(tmp / "evil.bin")
    name = "builtins.exec" if how == "builtins.exec" else f"{os.system.__module__}.system"
    assert str(e.value) == (f"{tmp / 'evil.bin'}: refused: it holds a {name} object, which "
                            "could run code; a .bin benchmark holds only image bytes and labels")
    assert not marker.exists()


@pytest.mark.parametrize("data, what", [
    (b"not a pickle", "not a readable pickle"),
    (pickle.dumps(([b"a", b"b"], [True]))[:-5], "not a readable pickle"),
    (pickle.dumps({"bins": []}), "holds a dict"),
    (pickle.dumps(([b"a", b"b", b"c"], [True])), "3 images for 1 pairs"),
    (pickle.dumps(([], [])), "it holds no pairs"),
    (pickle.dumps((["a", "b"], [True])), "not a list of encoded image bytes"),
    (pickle.dumps(([b"a", b"b"], ["yes"])), "labels are not a list of booleans"),
    (pickle.dumps(([b"a", b"b"], [2])), "labels are not a list of booleans"),
], ids=["garbage", "truncated", "dict", "odd-images", "empty", "str-images", "str-labels",
        "label-2"])
def test_bin_malformed(tmp_path, data, what):
    (tmp_path / "bad.bin").write_bytes(data)
    with pytest.raises(ds.ProtocolError) as e:
        pr.read_pairs(tmp_path / "bad.bin")
    assert str(e.value).startswith(f"{tmp_path / 'bad.bin'}: ") and what in str(e.value)
    assert "\n" not in str(e.value)


def test_bin_image_that_does_not_decode(folder):
    tmp, pairs = folder
    bins = bins_of(pairs)
    bins[3] = b"garbage"
    pr.write_bin(tmp / "x.bin", bins, [p.same for p in pairs])
    got, images = pr.read_pairs(tmp / "x.bin")
    with pytest.raises(ds.ProtocolError, match=r"x\.bin#3: not a readable image.*damaged"):
        pr.images_of_for(images, 32)([got[1].path_b])


# ------------------------------------------------------------------ real LFW

@needs_lfw
def test_real_view1_as_bin_gives_the_lfw_readers_pairs(tmp_path):
    """pairsDevTest.txt converted to a .bin of deep-funneled images reads back as exactly the
    LFW reader's pairs and labels, image for image."""
    lfw = Path(LFW_DIR)
    names = [(a, i, b, j) for a, i, b, j, _, _ in ds.parse_pairs(lfw / "pairsDevTest.txt")]
    wanted = {f"lfw-deepfunneled/{n}/{n}_{k:04d}.jpg" for a, i, b, j in names
              for n, k in ((a, i), (b, j))}
    with tarfile.open(lfw / "lfw-deepfunneled.tgz") as tar:
        tar.extractall(tmp_path, members=[m for m in tar if m.name in wanted], filter="data")
    images_dir = tmp_path / "lfw-deepfunneled"
    lfw_pairs, _ = pr.read_pairs(lfw / "pairsDevTest.txt", images_dir)
    assert not pr.missing_images(lfw_pairs)
    pr.write_bin(tmp_path / "lfw_view1.bin", bins_of(lfw_pairs), [p.same for p in lfw_pairs])
    bin_pairs, images = pr.read_pairs(tmp_path / "lfw_view1.bin")
    assert len(bin_pairs) == len(lfw_pairs) == 1000
    assert [p.same for p in bin_pairs] == [p.same for p in lfw_pairs]
    sample = range(0, 1000, 97)  # decoding all 2000 twice adds nothing the bytes don't show
    assert all(images[bin_pairs[k][s]] == lfw_pairs[k][s].read_bytes() for k in range(1000)
               for s in (0, 1))
    a = pr.images_of_for(images, 112)([bin_pairs[k].path_a for k in sample])
    b = pr.images_of_for(None, 112)([lfw_pairs[k].path_a for k in sample])
    assert torch.equal(a, b)
