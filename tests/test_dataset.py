import os
import random
from pathlib import Path

import pytest
import torch

import dataset as ds
from conftest import LFW_DIR, needs_lfw, write_people


# ------------------------------------------------------------------ protocol parsing

@needs_lfw
def test_real_protocol_files_parse_to_official_counts():
    d = Path(LFW_DIR)
    pairs = ds.parse_pairs(d / "pairs.txt")
    assert len(pairs) == 6000 and sum(p[4] for p in pairs) == 3000
    # View 2 layout: fold k is lines k*600+1 .. k*600+600, matched first.
    for k in range(10):
        fold = [p for p in pairs if p[5] == k]
        assert len(fold) == 600 and [p[4] for p in fold] == [1] * 300 + [0] * 300
    assert pairs[0][:5] == ("Abel_Pacheco", 1, "Abel_Pacheco", 4, 1)
    assert len(ds.parse_pairs(d / "pairsDevTrain.txt")) == 2200
    assert len(ds.parse_pairs(d / "pairsDevTest.txt")) == 1000
    folds = ds.parse_people(d / "people.txt")
    assert len(folds) == 10 and sum(len(f) for f in folds) == 5749
    assert sum(sum(f.values()) for f in folds) == 13233
    train, = ds.parse_people(d / "peopleDevTrain.txt")
    test, = ds.parse_people(d / "peopleDevTest.txt")
    assert (len(train), sum(train.values()), len(test)) == (4038, 9525, 1711)
    assert not set(train) & set(test)
    # View 1: the DevTest pairs only use DevTest people.
    assert ds.pair_people(ds.parse_pairs(d / "pairsDevTest.txt")) <= set(test)


def test_view2_splits_keep_every_fold_disjoint(lfw_root):
    """make_split on the real protocol files: in every View 2 fold the training (and
    validation) people and the test pairs' people are disjoint, the fold's 600 official pairs
    are the test set, and every person of the other nine folds is used."""
    folds = ds.parse_people(lfw_root / "people.txt")
    pairs = ds.parse_pairs(lfw_root / "pairs.txt")
    for k in range(10):
        s = ds.make_split(lfw_root / "images", lfw_root, split="view2", fold=k)
        seen = set(s["train"]) | set(s["val_people"])
        test = {Path(p).parent.name for a, b, _ in s["test_pairs"] for p in (a, b)}
        assert len(s["test_pairs"]) == 600 and not seen & test, k
        assert seen == set().union(*(f for j, f in enumerate(folds) if j != k)), k
        official = ds.pairs_to_paths([p for p in pairs if p[5] == k], lfw_root / "images")
        assert s["test_pairs"] == official, k


@pytest.mark.parametrize("text,message", [
    ("2\nA\t1\t2\nB\t1\t2\nC\t1\tD\t1\n", "promises 1 x 2 x 2 = 4 pairs but the file has 3"),
    ("1\nA\t1\nB\t1\tC\t1\n", ":2: expected 'name i j'"),
    ("1\nA\t1\t2\nB\t1\tC\n", ":3: expected 'name_a i name_b j'"),
    ("1\nA\tx\t2\nB\t1\tC\t1\n", ":2: expected a positive whole number, got 'x'"),
    ("1 2 3\n", ":1: header should be"),
    ("", "empty"),
])
def test_malformed_pairs_file_names_file_and_line(tmp_path, text, message):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(ds.ProtocolError) as e:
        ds.parse_pairs(path)
    assert message in str(e.value) and str(path) in str(e.value)
    assert "download_data.py" in str(e.value)


def test_missing_protocol_file(tmp_path):
    with pytest.raises(ds.ProtocolError, match="pairsDevTest.txt: missing"):
        ds.parse_pairs(tmp_path / "pairsDevTest.txt")


def test_people_file_parsing_and_errors(tmp_path):
    path = tmp_path / "people.txt"
    path.write_text("2\n2\nA\t3\nB\t1\n1\nC\t2\n")
    assert ds.parse_people(path) == [{"A": 3, "B": 1}, {"C": 2}]
    path.write_text("3\nA\t3\nB\t1\nC\t2\n")  # single set, as peopleDevTrain.txt
    assert ds.parse_people(path) == [{"A": 3, "B": 1, "C": 2}]
    path.write_text("2\n2\nA\t3\nB\n1\nC\t2\n")
    with pytest.raises(ds.ProtocolError, match=r"people.txt:4: expected 'name n'"):
        ds.parse_people(path)


def test_identities_errors_for_missing_and_empty_folders(tmp_path):
    with pytest.raises(ds.ProtocolError, match="no such folder.*download_data.py"):
        ds.read_identities(tmp_path / "nope")
    (tmp_path / "empty" / "Somebody").mkdir(parents=True)
    with pytest.raises(ds.ProtocolError, match="no <person>/<image>.jpg files"):
        ds.read_identities(tmp_path / "empty")


# ------------------------------------------------------------------ sampling and splits

def fake_people(n_people=30, seed=0):
    rng = random.Random(seed)
    return {f"P{i}": [Path(f"P{i}/P{i}_{j:04d}.jpg") for j in range(1, rng.randint(1, 6) + 1)]
            for i in range(n_people)}


def test_sampled_pairs_are_balanced_never_self_and_labelled_right():
    people = fake_people()
    owner = {img: n for n, imgs in people.items() for img in imgs}
    pairs = ds.sample_pairs(people, 2000, seed=1)
    assert len(pairs) == 2000 and sum(p[2] for p in pairs) == 1000
    for a, b, same in pairs:
        assert a != b  # no image paired with itself
        assert (owner[a] == owner[b]) == bool(same)
    singles = {n for n, imgs in people.items() if len(imgs) == 1}
    assert not any(owner[a] in singles for a, b, same in pairs if same)


def test_sampling_is_deterministic_per_seed_and_redrawn_per_epoch():
    people = fake_people()
    assert ds.sample_pairs(people, 100, seed=5) == ds.sample_pairs(people, 100, seed=5)
    assert ds.sample_pairs(people, 100, seed=5) != ds.sample_pairs(people, 100, seed=6)


def test_sampling_needs_a_person_with_two_images():
    with pytest.raises(ds.ProtocolError, match="too few people"):
        ds.sample_pairs({"A": [Path("a")], "B": [Path("b")]}, 10, seed=0)


@pytest.mark.parametrize("split", ["view1", "random"])
def test_splits_are_identity_disjoint(synthetic_lfw, split):
    s = ds.make_split(synthetic_lfw / "images", synthetic_lfw, split=split, seed=3,
                      val_fraction=0.25, val_pairs=40)
    train = set(s["train"])
    val = {Path(p).parent.name for a, b, _ in s["val_pairs"] for p in (a, b)}
    test = {Path(p).parent.name for a, b, _ in s["test_pairs"] for p in (a, b)}
    assert train and val and test
    assert not train & val and not train & test and not val & test
    assert set(s["val_people"]) >= val
    again = ds.make_split(synthetic_lfw / "images", synthetic_lfw, split=split, seed=3,
                          val_fraction=0.25, val_pairs=40)
    assert again == s  # evaluation pairs are fixed for a seed


def test_view1_without_people_file_uses_everyone_absent_from_devtest(synthetic_lfw):
    (synthetic_lfw / "peopleDevTrain.txt").unlink()
    s = ds.make_split(synthetic_lfw / "images", synthetic_lfw, split="view1", val_fraction=0.2)
    everyone = set(s["train"]) | set(s["val_people"])
    assert everyone == {n for n in ds.read_identities(synthetic_lfw / "images")
                        if not n.startswith("Test_")}


def test_slice_of_data_is_a_seeded_random_subset_of_people(synthetic_lfw):
    a = ds.make_split(synthetic_lfw / "images", synthetic_lfw, slice_of_data=8, seed=1,
                      val_fraction=0.25, val_pairs=10)
    b = ds.make_split(synthetic_lfw / "images", synthetic_lfw, slice_of_data=8, seed=2,
                      val_fraction=0.25, val_pairs=10)
    assert len(a["train"]) + len(a["val_people"]) == 8
    assert set(a["train"]) | set(a["val_people"]) != set(b["train"]) | set(b["val_people"])
    first8 = sorted(n for n in ds.read_identities(synthetic_lfw / "images")
                    if n.startswith("Train") or n == "Single_Image")[:8]
    assert set(a["train"]) | set(a["val_people"]) != set(first8)


def test_identity_batches_hold_p_people_times_k_images():
    people = fake_people(40)
    batches = ds.identity_batches(people, batch_size=12, per_person=3, seed=0)
    assert batches
    for batch in batches:
        owners = [p.parent.name for p in batch]
        assert len(batch) == 12 and len(set(owners)) == 4
        assert all(owners.count(o) == 3 for o in set(owners))
        assert all(len(people[o]) >= 2 for o in owners)


# ------------------------------------------------------------------ images and datasets

def test_image_bank_cache_matches_reading_from_disk(tmp_path):
    write_people(tmp_path, {"A": 2, "B": 1}, size=40)
    paths = sorted(tmp_path.rglob("*.jpg"))
    cached, lazy = ds.ImageBank(paths, 32, cache=True), ds.ImageBank(paths, 32, cache=False)
    assert cached.images.shape == (3, 3, 32, 32) and cached.images.dtype == torch.uint8
    for p in paths:
        assert torch.equal(cached[p], lazy[p])


# ImageNet's statistics, written out here so that a change to dataset.MEAN/STD is caught.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(img):
    """(v/255 - mean) / std per channel, by hand."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img.double() / 255 - mean) / std


def test_pair_dataset_gives_normalised_tensors_and_labels(tmp_path):
    write_people(tmp_path, {"A": 2, "B": 1}, size=40)
    paths = sorted(tmp_path.rglob("*.jpg"))
    bank = ds.ImageBank(paths, 32)
    data = ds.PairDataset([(paths[0], paths[1], 1), (paths[0], paths[2], 0)], bank,
                          ds.train_transform(32, augment_p=1.0))
    a, b, label = data[1]
    assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.float32
    assert label.item() == 0.0 and len(data) == 2
    plain = ds.eval_transform()(bank[paths[0]])
    assert plain.dtype == torch.float32
    assert torch.allclose(plain.double(), normalised(bank[paths[0]]), atol=1e-5)


def test_normalisation_values_by_hand():
    # Channel c of pixel (0, 0) holds 0, of pixel (0, 1) 255, of pixel (1, 0) 128.
    img = torch.zeros(3, 2, 2, dtype=torch.uint8)
    img[:, 0, 1], img[:, 1, 0], img[:, 1, 1] = 255, 128, 51
    out = ds.eval_transform()(img)
    assert out[:, 0, 0].tolist() == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225],
                                                  abs=1e-5)
    assert out[:, 0, 1].tolist() == pytest.approx([0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225],
                                                  abs=1e-5)
    assert torch.allclose(out.double(), normalised(img), atol=1e-5)
    # Training images go through the same normalisation: with no augmentation, a constant
    # image (which flips cannot change) comes out as the same constants.
    flat = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    flat[1], flat[2] = 0, 255
    bank = {"a": flat, "b": flat}
    x, y, label = ds.PairDataset([("a", "b", 1)], bank, ds.train_transform(8, augment_p=0.0))[0]
    assert torch.allclose(x.double(), normalised(flat), atol=1e-5) and torch.equal(x, y)
    assert x[:, 3, 3].tolist() == pytest.approx([(128 / 255 - 0.485) / 0.229, -0.456 / 0.224,
                                                 (1 - 0.406) / 0.225], abs=1e-5)
    assert label.item() == 1.0


def test_view2_fold_out_of_range_is_a_clear_error(tmp_path):
    write_people(tmp_path / "images", {"A": 2, "B": 2}, size=16)
    (tmp_path / "people.txt").write_text("2\n1\nA\t2\n1\nB\t2\n")
    with pytest.raises(ds.ProtocolError, match=r"people.txt: has folds 0-1, not 10"):
        ds.make_split(tmp_path / "images", tmp_path, split="view2", fold=10)


def test_one_rule_for_what_counts_as_a_persons_photo(tmp_path):
    """Hidden folders and files, loose files, other suffixes and empty folders are no one's
    photos; a linked person folder is followed. Training and the crop read the same people."""
    import crop_dataset_to_faces as crop
    write_people(tmp_path / "images", {"Ann_A": 2, "Bob_B": 1})
    images = tmp_path / "images"
    write_people(tmp_path / "elsewhere", {"Cy_C": 1})
    os.symlink(tmp_path / "elsewhere" / "Cy_C", images / "Cy_C", target_is_directory=True)
    (images / ".ipynb_checkpoints").mkdir()
    (images / ".ipynb_checkpoints" / "x.jpg").write_bytes(b"")
    (images / "Ann_A" / "._Ann_A_0001.jpg").write_bytes(b"")  # macOS metadata, not a photo
    (images / "Ann_A" / "notes.txt").write_text("hi")
    (images / "Empty").mkdir()
    (images / "loose.jpg").write_bytes(b"")
    want = {"Ann_A": ["Ann_A_0001.jpg", "Ann_A_0002.jpg"], "Bob_B": ["Bob_B_0001.jpg"],
            "Cy_C": ["Cy_C_0001.jpg"]}
    got = ds.read_identities(images)
    assert {k: [p.name for p in v] for k, v in got.items()} == want
    assert crop.find_images(images) == [p for v in got.values() for p in v]
