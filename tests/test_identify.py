"""identify.py (1:N identification against a gallery folder, with its embedding cache), the
identification metrics in metrics.py against planted score matrices, and evaluate.py
--identify end to end on a synthetic LFW. Real faces come from scikit-image's public-domain
photos (the astronaut and the cameraman); no face image is committed."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import dataset as ds
import evaluate
import faces
import identify
import losses
import metrics
import model as m
import training
import trainer2
from inference import FaceModel
from runtime import sha256_file
from conftest import tiny_args, two_face_photo, write_people, write_view1_protocol
from conftest import write_jpeg as jpeg

TRAIN = {f"Train_Person_{k:02d}": 4 + k % 3 for k in range(12)}
# Test people with one image give the open set its non-mated probes.
TEST = {**{f"Test_Person_{k:02d}": 3 + k % 2 for k in range(4)},
        **{f"Test_Single_{k:02d}": 1 for k in range(3)}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny trained checkpoint (as tests/test_verify.py makes one) and photos: the
    astronaut, her mirror image, the cameraman, a blank image, a query of the astronaut
    cropped and scaled (another photo of an enrolled person) and one with two faces."""
    from skimage.data import astronaut, camera
    from skimage.transform import resize
    root = tmp_path_factory.mktemp("identify")
    write_people(root / "images", {**TRAIN, **TEST})
    write_view1_protocol(root, TRAIN, TEST)
    # Every single-image person in a mismatched pair, so that the open set has them all.
    lines = (root / "pairsDevTest.txt").read_text().splitlines()
    lines[-3:] = [f"Test_Single_{k:02d}\t1\tTest_Person_{k:02d}\t1" for k in range(3)]
    (root / "pairsDevTest.txt").write_text("\n".join(lines) + "\n")
    (root / "images" / faces.SETTINGS_FILE).write_text(json.dumps(faces.crop_settings()))
    assert training.main(vars(trainer2), tiny_args(root, root / "run", epochs=1)) == 0
    face = astronaut()
    two = two_face_photo(face)
    other = (resize(face[20:480, 40:500], (400, 400)) * 255).astype(np.uint8)
    photos = root / "photos"
    return {"root": root, "ckpt": root / "run" / "best_accuracy.pt",
            "astronaut": jpeg(photos / "astronaut.jpg", face),
            "mirror": jpeg(photos / "mirror.jpg", face[:, ::-1]),
            "camera": jpeg(photos / "camera.jpg", camera()),
            "blank": jpeg(photos / "blank.jpg", np.full((250, 250, 3), 128, np.uint8)),
            "query": jpeg(photos / "query.jpg", other),
            "two": jpeg(photos / "two_faces.jpg", two)}


def make_gallery(folder, s, blank=True):
    """Eileen (astronaut and mirror), Camera_Man, and a person whose one photo is blank."""
    for person, key, name in (("Eileen", "astronaut", "a.jpg"), ("Eileen", "mirror", "b.jpg"),
                              ("Camera_Man", "camera", "c.jpg")) + \
            ((("Nobody", "blank", "n.jpg"),) if blank else ()):
        (folder / person).mkdir(parents=True, exist_ok=True)
        shutil.copy(s[key], folder / person / name)
    return folder


def run(capsys, *argv):
    code = identify.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def counting(monkeypatch):
    """Count the gallery faces embedded, the photos detected, and the MTCNN calls that
    detected them (gallery only: queries go through every_face_for_model)."""
    seen = {"embedded": 0, "detected": 0, "calls": 0}
    embed, detect = FaceModel.embed, faces.faces_for_model

    def counted_embed(fm, crops, *a, **k):
        seen["embedded"] += len(crops)
        return embed(fm, crops, *a, **k)

    def faces_for_model(detector, images, *a, **k):
        seen["detected"] += len(images)
        seen["calls"] += 1
        return detect(detector, images, *a, **k)
    monkeypatch.setattr(FaceModel, "embed", counted_embed)
    monkeypatch.setattr(faces, "faces_for_model", faces_for_model)
    return seen


# ---------------------------------------------------------------- identify.py

def test_the_enrolled_person_ranks_first_and_the_blank_photo_is_skipped(setup, tmp_path, capsys):
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s)
    code, out, err = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"],
                         "--threshold", -1e9)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"model: {s['ckpt']} (threshold -1000000000.0000, --threshold)"
    assert "2 people in 3 photos with a face (1 skipped)" in lines[1]
    assert f"{s['query']}: 1 face" in out and "face 1 at [" in out and ": Eileen (score" in out
    assert err.strip() == f"warning: {gallery / 'Nobody' / 'n.jpg'}: skipped, no face found"
    code, out, _ = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"], "--threshold",
                       -1e9, "--json", "--top", 5)
    [r] = json.loads(out)
    [f] = r["faces"]
    assert r["n_faces"] == 1 and r["checkpoint"] == str(s["ckpt"]) and len(f["box"]) == 4
    assert f["known"] is True and f["identity"] == "Eileen"
    assert [t["person"] for t in f["top"]] == ["Eileen", "Camera_Man"]  # 2 people, not 5
    # Matched by her best photo: the one the query was cut from, not the mirror.
    assert f["top"][0]["photo"] == str(gallery / "Eileen" / "a.jpg")
    assert f["score"] == f["top"][0]["score"] > f["top"][1]["score"]


def test_unknown_when_the_threshold_is_above_every_score(setup, tmp_path, capsys):
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s)
    code, out, _ = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"], "--threshold", 1e9)
    assert code == 0 and "face 1 at [" in out and ": unknown (best score" in out
    code, out, _ = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"], "--threshold",
                       1e9, "--json")
    [f] = json.loads(out)[0]["faces"]
    assert f["known"] is False and f["identity"] is None and f["top"][0]["person"] == "Eileen"
    # The default threshold is the checkpoint's own.
    code, out, _ = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"], "--json")
    saved = torch.load(s["ckpt"], weights_only=True)
    r = json.loads(out)[0]
    assert r["threshold"] == pytest.approx(saved["threshold"])
    assert r["threshold_source"] == "checkpoint"


def test_every_face_of_a_query_is_answered_with_its_box(setup, tmp_path, capsys):
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s)
    code, out, _ = run(capsys, gallery, s["two"], s["blank"], "--checkpoint", s["ckpt"],
                       "--threshold", -1e9, "--json")
    two, blank = json.loads(out)
    assert code == 0 and two["n_faces"] == 2 and len(two["faces"]) == 2
    big, small = two["faces"]
    assert big["box"][0] < 512 <= small["box"][0]  # the larger face first; the copy on the right
    assert big["identity"] == small["identity"] == "Eileen"
    assert blank["n_faces"] == 0 and blank["faces"] == []
    code, out, _ = run(capsys, gallery, s["two"], s["blank"], "--checkpoint", s["ckpt"])
    assert code == 0 and f"{s['two']}: 2 faces" in out and "face 2 at [" in out
    assert f"{s['blank']}: no face found" in out


def test_the_cache_embeds_only_what_changed(setup, tmp_path, capsys, monkeypatch):
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s)
    seen = counting(monkeypatch)
    # The blank query has no face, so every embedding counted is a gallery photo's.
    args = (gallery, s["blank"], "--checkpoint", s["ckpt"], "--json")
    assert run(capsys, *args)[0] == 0
    # The blank photo is detected, not embedded; the three 512 px photos share one MTCNN pass
    # and the 250 px blank one gets its own.
    assert seen == {"embedded": 3, "detected": 4, "calls": 2}
    [cache] = gallery.glob(".identify-cache-*.pt")
    assert cache.name == f".identify-cache-{sha256_file(s['ckpt'])[:16]}.pt"
    assert run(capsys, *args)[0] == 0
    assert seen == {"embedded": 3, "detected": 4, "calls": 2}  # nothing again, not even
    # the no-face photo
    # A changed file is embedded again, and only it; a removed one drops out of the cache.
    shutil.copy(s["query"], gallery / "Camera_Man" / "c.jpg")
    (gallery / "Eileen" / "b.jpg").unlink()
    assert run(capsys, *args)[0] == 0
    assert seen == {"embedded": 4, "detected": 5, "calls": 3}
    saved = torch.load(cache, weights_only=True)
    assert len(saved["hashes"]) == saved["embeddings"].shape[0] == 2
    assert len(saved["failed"]) == 1
    # Camera_Man's photo is now the query itself: his new embedding scores a perfect cosine.
    query = (gallery, s["query"], "--checkpoint", s["ckpt"], "--json")
    code, out, _ = run(capsys, *query)
    top = json.loads(out)[0]["faces"][0]["top"][0]
    assert top["person"] == "Camera_Man" and top["score"] == pytest.approx(0, abs=1e-5)
    assert seen == {"embedded": 5, "detected": 5, "calls": 3}  # the query's face alone
    # A run without the cache gives the same answers (to bf16 rounding, which depends on the
    # batch: the checkpoint embeds in mixed precision).
    cache.unlink()
    fresh, cached = json.loads(run(capsys, *query)[1])[0], json.loads(out)[0]
    assert [t["person"] for t in fresh["faces"][0]["top"]] == \
        [t["person"] for t in cached["faces"][0]["top"]]
    assert [t["score"] for t in fresh["faces"][0]["top"]] == \
        pytest.approx([t["score"] for t in cached["faces"][0]["top"]], abs=0.02)


def test_a_damaged_cache_is_rebuilt(setup, tmp_path, capsys):
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s, blank=False)
    args = (gallery, s["query"], "--checkpoint", s["ckpt"], "--json")
    before = json.loads(run(capsys, *args)[1])
    [cache] = gallery.glob(".identify-cache-*.pt")
    cache.write_bytes(b"not a torch file")
    code, out, err = run(capsys, *args)
    assert code == 0 and json.loads(out) == before and "re-embedding the gallery" in err


def one_line(err):
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_bad_gallery_or_query_is_exit_2_with_one_line(setup, tmp_path, capsys):
    s = setup
    ckpt = ("--checkpoint", s["ckpt"])
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, tmp_path / "empty", s["query"], *ckpt)
    assert code == 2 and one_line(err).startswith(f"error: {tmp_path / 'empty'}: no <person>/")
    assert "subfolder named after them" in err
    code, _, err = run(capsys, tmp_path / "nowhere", s["query"], *ckpt)
    assert code == 2 and "no such gallery folder" in one_line(err)
    blank_only = tmp_path / "blank_only"
    (blank_only / "Nobody").mkdir(parents=True)
    shutil.copy(s["blank"], blank_only / "Nobody" / "n.jpg")
    code, _, err = run(capsys, blank_only, s["query"], *ckpt)
    assert code == 2 and one_line(err) == (
        f"error: {blank_only}: no face found in any of its 1 photos; use photos where the face "
        "is clearly visible and roughly frontal")
    gallery = make_gallery(tmp_path / "gallery", s)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, out, err = run(capsys, gallery, s["query"], broken, *ckpt)
    assert code == 2 and out == ""
    assert one_line(err).startswith(f"error: {broken}: not a readable image")
    code, _, err = run(capsys, gallery, s["query"], "--checkpoint", tmp_path / "none.pt")
    assert code == 2 and "none.pt: no such checkpoint" in one_line(err)


def test_the_gallery_follows_the_one_folder_rule(setup, tmp_path):
    """gallery_files is dataset.scan_people's rule, the one training and the crop use: a
    hidden folder is no person, a hidden file no photo, a linked person folder is followed,
    and files directly in the gallery are no one's."""
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s, blank=False)
    shutil.copy(s["query"], gallery / "loose.jpg")
    (gallery / ".ipynb_checkpoints").mkdir()
    shutil.copy(s["query"], gallery / ".ipynb_checkpoints" / "q.jpg")
    shutil.copy(s["query"], gallery / "Eileen" / "._a.jpg")  # macOS's resource fork
    (gallery / "Empty").mkdir()
    elsewhere = make_gallery(tmp_path / "elsewhere", s, blank=True)
    (gallery / "Nobody").symlink_to(elsewhere / "Nobody", target_is_directory=True)
    files = identify.gallery_files(gallery)
    assert [(person, p.relative_to(gallery).as_posix()) for person, p in files] == [
        ("Camera_Man", "Camera_Man/c.jpg"), ("Eileen", "Eileen/a.jpg"),
        ("Eileen", "Eileen/b.jpg"), ("Nobody", "Nobody/n.jpg")]
    assert files == [(person, p) for person, photos in ds.scan_people(gallery).items()
                     for p in photos]


def test_an_unreadable_gallery_photo_is_skipped(setup, tmp_path, capsys):
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s, blank=False)
    (gallery / "Eileen" / "broken.png").write_bytes(b"not an image")
    code, out, err = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"])
    assert code == 0 and "(1 skipped)" in out
    assert one_line(err) == (f"warning: {gallery / 'Eileen' / 'broken.png'}: skipped, not a "
                             "readable image; use a JPEG or PNG photo")


def test_any_other_failure_is_exit_2(setup, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("detector weights unreadable")
    monkeypatch.setattr(faces, "detector_for", broken)
    gallery = make_gallery(tmp_path / "gallery", setup)
    code, _, err = run(capsys, gallery, setup["query"], "--checkpoint", setup["ckpt"])
    assert code == 2 and "RuntimeError: detector weights unreadable" in one_line(err)


class Ident(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.out_dim = dim

    def forward(self, x):
        return x


@pytest.mark.parametrize("loss,distance", [("arcface", "cosine"), ("triplet", "l1"),
                                           ("bce", "cosine"), ("bce", "l1")])
def test_score_matrix_is_net_score_of_every_pair(loss, distance):
    torch.manual_seed(0)
    net = m.SiameseNet(Ident(8), losses.LOSSES[loss].pair_head(8, distance), distance).eval()
    if net.head is not None:
        nn.init.normal_(net.head.weight)
    q, g = torch.randn(3, 8), torch.randn(5, 8)
    got = net.score_matrix(q, net.prepare_gallery(g))  # what identify.py searches with
    want = torch.stack([net.score(q[i].expand(5, 8), g) for i in range(3)])
    assert got.shape == (3, 5) and torch.allclose(got, want, atol=1e-5)


def test_search_takes_each_persons_best_photo():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.1, 0.0, 0.8]])
    person_of = torch.tensor([0, 1, 1, 2])  # person 1 has two photos
    values, people = identify.search(scores, person_of, 3, 5)
    assert people.tolist() == [[1, 2, 0], [2, 0, 1]]
    assert values.flatten().tolist() == pytest.approx([0.9, 0.3, 0.1, 0.8, 0.2, 0.1])
    assert identify.search_seconds(1000, dim=16, repeats=2) < 1


# ---------------------------------------------------------------- metrics

# 3 gallery people; probes 0-3 are mated, 4-5 are not. Rows: A, B, C's scores.
PLANTED = np.array([
    [0.9, 0.2, 0.1],   # A: rank 1, score 0.9
    [0.3, 0.7, 0.1],   # B: rank 1, score 0.7
    [0.7, 0.2, 0.4],   # C: rank 2 (A above)
    [0.6, 0.5, 0.1],   # B: rank 2
    [0.75, 0.1, 0.2],  # non-mated, best 0.75
    [0.1, 0.3, 0.2],   # non-mated, best 0.3
])
PROBES = ["A", "B", "C", "B", "X", "Y"]


def test_closed_set_ranks_and_cmc():
    ranks, mated = metrics.identification_ranks(PLANTED, PROBES, ["A", "B", "C"])
    assert ranks.tolist() == [1, 1, 2, 2] and mated.tolist() == [True] * 4 + [False] * 2
    assert metrics.cmc(ranks, 4) == [0.5, 1.0, 1.0, 1.0]
    # A tie counts against the probe; a person's best photo is its score.
    ranks, _ = metrics.identification_ranks([[0.5, 0.5, 0.1]], ["A"], ["A", "B", "C"])
    assert ranks.tolist() == [2]
    ranks, _ = metrics.identification_ranks([[0.5, 0.2, 0.9, 0.6]], ["A"], ["A", "B", "A", "C"])
    assert ranks.tolist() == [1]
    person, people = metrics.best_per_person([[0.5, 0.2, 0.9, 0.6]], ["A", "B", "A", "C"])
    assert people.tolist() == ["A", "B", "C"] and person.tolist() == [[0.9, 0.2, 0.6]]


def test_open_set_dir_follows_blufr():
    gallery = ["A", "B", "C"]
    # FAR 0.5 of 2 non-mated: one false alarm allowed, the threshold is the highest non-mated
    # best score (0.75); mated probes ranked first and >= 0.75: only the first (0.9).
    assert metrics.dir_at_far(PLANTED, PROBES, gallery, 0.5) == (pytest.approx(0.25), 0.75)
    # FAR 1.0: both allowed, threshold 0.3: both rank-1 probes count.
    assert metrics.dir_at_far(PLANTED, PROBES, gallery, 1.0) == (pytest.approx(0.5), 0.3)
    # FAR 0.1 rounds to no false alarm: just above 0.75. FAR 0.25 is half a false alarm,
    # rounded up as MATLAB's round (BLUFR's code) rounds it.
    assert metrics.open_set_threshold([0.75, 0.3], 0.25) == 0.75
    rate, threshold = metrics.dir_at_far(PLANTED, PROBES, gallery, 0.1)
    assert rate == pytest.approx(0.25) and 0.75 < threshold < 0.75 + 1e-12
    r = metrics.identification_summary(PLANTED, PROBES, gallery, fars=(0.5, 1.0), max_rank=5)
    assert (r["rank1"], r["rank5"]) == (0.5, 1.0)
    assert (r["dir@far=0.5"], r["dir@far=1"]) == pytest.approx((0.25, 0.5))
    assert (r["n_gallery"], r["n_mated_probes"], r["n_nonmated_probes"]) == (3, 4, 2)
    # 100 non-mated probes: FAR 1% allows exactly one false alarm, 10% ten.
    rng = np.random.default_rng(0)
    nonmated = rng.random((100, 3)) * 0.5
    mated = np.full((10, 3), 0.0)
    mated[np.arange(10), np.arange(10) % 3] = np.linspace(0.3, 0.6, 10)
    scores = np.vstack([mated, nonmated])
    probes = [["A", "B", "C"][k % 3] for k in range(10)] + ["X"] * 100
    r = metrics.identification_summary(scores, probes, gallery)
    best = np.sort(nonmated.max(1))[::-1]
    t1, t10 = r["open_set_thresholds"]["dir@far=0.01"], r["open_set_thresholds"]["dir@far=0.1"]
    assert (t1, t10) == (best[0], best[9])
    assert np.sum(nonmated.max(1) >= t10) == 10
    assert r["dir@far=0.01"] == np.mean(np.linspace(0.3, 0.6, 10) >= t1)
    assert r["dir@far=0.1"] == np.mean(np.linspace(0.3, 0.6, 10) >= t10)
    assert r["rank1"] == 1.0 and r["n_nonmated_probes"] == 100


def test_without_non_mated_probes_dir_is_none():
    r = metrics.identification_summary(PLANTED[:4], PROBES[:4], ["A", "B", "C"])
    assert r["dir@far=0.01"] is None and r["dir@far=0.1"] is None and r["rank1"] == 0.5


# ---------------------------------------------------------------- evaluate.py --identify

def test_evaluate_identify_writes_results_and_cmc(setup, capsys):
    root, ckpt = setup["root"], setup["ckpt"]
    code = evaluate.main([str(ckpt), "--identify", "--pairs", str(root / "pairsDevTest.txt")])
    out, _ = capsys.readouterr()
    assert code == 0
    folder = ckpt.parent / "eval-identify-pairsDevTest"
    r = json.loads((folder / "results.json").read_text())
    assert {"rank1", "rank5", "dir@far=0.01", "dir@far=0.1", "n_gallery", "n_mated_probes",
            "n_nonmated_probes", "checkpoint", "pairs", "data"} <= set(r)
    people = evaluate.ds.pair_people(evaluate.ds.parse_pairs(root / "pairsDevTest.txt"))
    counts = {**TRAIN, **TEST}
    assert r["n_gallery"] == sum(counts[p] >= 2 for p in people)
    assert r["n_mated_probes"] == sum(counts[p] - 1 for p in people if counts[p] >= 2)
    assert r["n_nonmated_probes"] == sum(counts[p] == 1 for p in people) == 3
    assert 0 <= r["rank1"] <= r["rank5"] <= 1 and len(r["cmc"]) == 20
    assert r["rank5"] == 1.0  # at most 4 people enrolled
    assert all(0 <= r[k] <= r["rank1"] for k in ("dir@far=0.01", "dir@far=0.1"))
    assert r["contaminated"] is False and r["checkpoint"] == str(ckpt)
    assert (folder / "cmc.png").stat().st_size > 0 and (folder / "probes.csv").is_file()
    assert "closed set  rank-1" in out and "open set    DIR" in out


def test_evaluate_identify_refuses_a_file_without_folds_for_fold(setup, capsys, tmp_path):
    root, ckpt = setup["root"], setup["ckpt"]
    code = evaluate.main([str(ckpt), "--identify", "--pairs", str(root / "pairsDevTest.txt"),
                          "--fold", "3", "--out", str(tmp_path)])
    assert code == 2 and "has no official fold 3" in capsys.readouterr().err


def test_far_picks_the_stored_threshold_and_says_what_a_stranger_risks(setup, tmp_path,
                                                                       capsys):
    s = setup
    gallery = make_gallery(tmp_path / "gallery", s)
    point = torch.load(s["ckpt"], weights_only=True)["operating_points"]["points"]["0.001"]
    code, out, _ = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"], "--far", "1e-3")
    assert code == 0
    assert f"(threshold {point['threshold']:.4f}, the checkpoint's threshold for FAR 0.001)" in out
    assert "about 1 in 1,000 different-person pairs score at or above" in out
    # Three photos with a face: a stranger meets three chances of FAR 1e-3.
    chance = 1 - (1 - point["far"]) ** 3
    assert f"with 3 gallery photos, a stranger's face matches someone at this threshold with a " \
           f"chance of about {chance:.0%}" in out
    code, out, _ = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"], "--far", "1e-3",
                       "--json")
    r = json.loads(out)[0]
    assert (r["threshold"], r["threshold_source"]) == (point["threshold"], "--far")
    code, _, err = run(capsys, gallery, s["query"], "--checkpoint", s["ckpt"], "--far", "2")
    assert code == 2 and "between 0 and 1" in err and err.count("\n") == 1
