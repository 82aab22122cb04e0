"""Hostile input to the command-line tools (issue 21, items 1, 3, 5, 9, 10 and 11 as they
reach verify.py, identify.py and evaluate.py): exit codes and NaN, evaluate.py's --compare
files and output folder, forged identification caches, names with control characters, one
photo under two people, damaged, 16-bit and animated gallery photos, and detection batches
capped by bytes. A tiny model trained on synthetic people; real faces from scikit-image's
public-domain photos. The crafted PNG cases run in a subprocess: on the old code the
decoder's native crash killed the process that read it."""
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import faces
import identify
import metrics
import model as m
import runtime
import training
import trainer2
import verify
from inference import FaceModel
from runtime import sha256_file
from conftest import small_lfw, tiny_args
from conftest import write_jpeg as jpeg

ROOT = Path(__file__).resolve().parent.parent
SEGFAULT = (-11, 139)


def png(width, height, raw, depth=8, colour=2):
    """A PNG from its filtered rows `raw`, with a valid IEND (as tests/test_hostile_images.py
    builds them)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body \
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def short_png():
    """The issue's crafted PNG: a 100x100 RGB header, complete compressed data holding only
    50 rows, a valid IEND (libpng inside torchvision segfaulted on it)."""
    return png(100, 100, b"".join(b"\0" + bytes(300) for _ in range(50)))


def png16(array):
    """A 48-bit (16 bits per sample) RGB PNG of an (H, W, 3) uint16 array."""
    rows = b"".join(b"\0" + row.tobytes() for row in array.astype(">u2"))
    return png(array.shape[1], array.shape[0], rows, depth=16, colour=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint trained on a synthetic LFW (its pairs file and images are there for
    evaluate.py) and photos: the astronaut, her mirror image, the cameraman and a blank."""
    from skimage.data import astronaut, camera
    root = tmp_path_factory.mktemp("hostile_cli")
    small_lfw(root)
    assert training.main(vars(trainer2), tiny_args(root, root / "run", epochs=1)) == 0
    photos = root / "photos"
    return {"root": root, "ckpt": root / "run" / "best_accuracy.pt",
            "pairs": root / "pairsDevTest.txt", "images": root / "images",
            "astronaut": jpeg(photos / "astronaut.jpg", astronaut()),
            "mirror": jpeg(photos / "mirror.jpg", astronaut()[:, ::-1]),
            "camera": jpeg(photos / "camera.jpg", camera()),
            "blank": jpeg(photos / "blank.jpg", np.full((250, 250, 3), 128, np.uint8))}


def status(main, capsys, *argv):
    """(exit status, stdout, stderr) of a main() as the process would exit: a SystemExit
    with a message is status 1, as the interpreter makes it."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def gallery_of(folder, s, people):
    """people: {person folder: [(photo key in setup, file name)]}."""
    for person, photos in people.items():
        (folder / person).mkdir(parents=True, exist_ok=True)
        for key, name in photos:
            shutil.copy(s[key], folder / person / name)
    return folder


def eileen_and_camera(folder, s):
    return gallery_of(folder, s, {"Eileen": [("astronaut", "a.jpg"), ("mirror", "b.jpg")],
                                  "Camera_Man": [("camera", "c.jpg")]})


def strict_json(text):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON output")
    return json.loads(text, parse_constant=refuse)


def run_script(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---------------------------------------------------------------- item 9: exit codes, NaN

def test_device_cuda_without_a_gpu_is_exit_2_never_the_verdict_1(setup, tmp_path, capsys,
                                                                 monkeypatch):
    s = setup
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = status(verify.main, capsys, s["astronaut"], s["astronaut"],
                            "--checkpoint", s["ckpt"], "--device", "cuda")
    assert code == 2 and out == "" and "--device cuda" in one_line(err) and "cpu" in err
    gallery = eileen_and_camera(tmp_path / "g", s)
    code, out, err = status(identify.main, capsys, gallery, s["astronaut"], "--checkpoint",
                            s["ckpt"], "--device", "cuda")
    assert code == 2 and out == "" and "--device cuda" in one_line(err)
    code, _, err = status(evaluate.main, capsys, s["ckpt"], "--pairs", s["pairs"], "--data",
                          s["images"], "--device", "cuda", "--out", tmp_path / "e")
    assert code == 2 and "--device cuda" in one_line(err)
    assert not (tmp_path / "e").exists()


def test_pick_device_refuses_with_a_value_error_not_a_system_exit(monkeypatch):
    """runtime.DeviceError, a ValueError each script catches with its other input errors:
    a SystemExit escapes every `except Exception` and exits with status 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, why in (("cuda", "no CUDA GPU is visible; use cpu"),
                      ("cuda:1", "no CUDA GPU is visible; use cpu"),
                      ("gpu", "not a device; use auto, cpu or cuda")):
        with pytest.raises(runtime.DeviceError) as e:
            runtime.pick_device(name)
        assert isinstance(e.value, ValueError) and str(e.value).startswith(f"--device {name}: ")
        assert str(e.value).endswith(why) and "\n" not in str(e.value)
    assert runtime.pick_device("cpu") == torch.device("cpu")
    assert runtime.pick_device("auto") == torch.device("cpu")


def test_an_unknown_device_name_is_exit_2_with_one_line(setup, tmp_path, capsys):
    s = setup
    gallery = eileen_and_camera(tmp_path / "g", s)
    ckpt = ("--checkpoint", s["ckpt"])
    for main, argv in ((verify.main, (s["astronaut"], s["astronaut"], *ckpt)),
                       (identify.main, (gallery, s["astronaut"], *ckpt)),
                       (evaluate.main, (s["ckpt"], "--pairs", s["pairs"], "--data", s["images"],
                                        "--out", tmp_path / "e"))):
        code, out, err = status(main, capsys, *argv, "--device", "gpu")
        assert code == 2 and out == ""
        assert one_line(err) == "error: --device gpu: not a device; use auto, cpu or cuda"
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_threshold_that_is_not_finite_is_refused_with_one_line(setup, tmp_path, capsys,
                                                                 value):
    s = setup
    code, out, err = status(verify.main, capsys, s["astronaut"], s["astronaut"],
                            "--checkpoint", s["ckpt"], f"--threshold={value}", "--json")
    assert code == 2 and out == ""
    assert one_line(err).startswith(f"error: --threshold {float(value)} is not a finite number")
    gallery = eileen_and_camera(tmp_path / "g", s)
    code, out, err = status(identify.main, capsys, gallery, s["astronaut"], "--checkpoint",
                            s["ckpt"], f"--threshold={value}", "--json")
    assert code == 2 and out == "" and "is not a finite number" in one_line(err)


def test_a_checkpoint_whose_threshold_is_nan_is_refused(setup, tmp_path, capsys):
    s = setup
    saved = torch.load(s["ckpt"], weights_only=True)
    saved["threshold"] = float("nan")
    torch.save(saved, tmp_path / "nan.pt")
    code, out, err = status(verify.main, capsys, s["astronaut"], s["astronaut"],
                            "--checkpoint", tmp_path / "nan.pt", "--json")
    assert code == 2 and out == ""
    assert one_line(err).startswith(f"error: {tmp_path / 'nan.pt'}: its threshold nan is not")
    gallery = eileen_and_camera(tmp_path / "g", s)
    code, out, err = status(identify.main, capsys, gallery, s["astronaut"], "--checkpoint",
                            tmp_path / "nan.pt", "--json")
    assert code == 2 and out == "" and "its threshold nan is not a finite" in one_line(err)


def test_a_nan_score_is_an_error_in_verify_and_null_in_identify_json(setup, tmp_path, capsys,
                                                                     monkeypatch):
    s = setup
    gallery = eileen_and_camera(tmp_path / "g", s)
    args = (gallery, s["astronaut"], "--checkpoint", s["ckpt"], "--json")
    assert status(identify.main, capsys, *args)[0] == 0  # the gallery is cached now
    real = FaceModel.embed

    def nan_embeddings(*a, **k):  # only the query is embedded from here on
        return torch.full_like(real(*a, **k), float("nan"))
    monkeypatch.setattr(FaceModel, "embed", nan_embeddings)
    code, out, err = status(identify.main, capsys, *args)
    assert code == 0, err
    [f] = strict_json(out)[0]["faces"]
    assert f["score"] is None and f["known"] is False and f["identity"] is None
    assert all(t["score"] is None for t in f["top"])
    code, out, _ = status(identify.main, capsys, *args[:-1])
    assert code == 0 and ": unknown (the score is nan, not a number" in out
    monkeypatch.setattr(FaceModel, "score_faces", lambda *a, **k: float("nan"))
    code, out, err = status(verify.main, capsys, s["astronaut"], s["astronaut"],
                            "--checkpoint", s["ckpt"], "--json")
    assert code == 2 and out == ""  # not exit 1, "different people", and not NaN in JSON
    assert one_line(err).startswith(f"error: {s['ckpt']}: the pair's score nan is not a finite")


# ---------------------------------------------------------------- item 10: evaluate.py

HEADER = "name_a,number_a,name_b,number_b,same,fold,score"


def scores_folder(folder, lines):
    folder.mkdir(parents=True)
    (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    return folder


def good_lines(n=40):
    return [HEADER] + [f"P{i},1,P{i},2,{int(i < n // 2)},0,{1.0 if i < n // 2 else -1.0}"
                       for i in range(n)]


@pytest.mark.parametrize("case,line,expect", [
    ("nan", 3, "the score 'nan' is not a finite number"),
    ("text", 3, "the score 'high' is not a finite number"),
    ("short", 3, "5 fields where its header has 7"),
    ("no_column", 1, "no score column in its header"),
    ("header_only", None, "no pairs in it, only a header"),
])
def test_compare_names_the_file_and_line_of_a_bad_scores_csv(tmp_path, capsys, case, line,
                                                             expect):
    lines = good_lines()
    if case == "nan":
        lines[2] = lines[2].rsplit(",", 1)[0] + ",nan"
    elif case == "text":
        lines[2] = lines[2].rsplit(",", 1)[0] + ",high"
    elif case == "short":
        lines[2] = ",".join(lines[2].split(",")[:5])
    elif case == "no_column":
        lines = [",".join(row.split(",")[:6]) for row in lines]
    elif case == "header_only":
        lines = [HEADER]
    base = scores_folder(tmp_path / "base", good_lines())
    bad = scores_folder(tmp_path / "bad", lines)
    where = f"{bad / 'scores.csv'}" + (f", line {line}" if line else "")
    for extra in ((), ("--out", tmp_path / "plots")):  # --out used to crash on NaN in sklearn
        code, out, err = status(evaluate.main, capsys, "--compare", base, bad, *extra)
        assert code == 2 and out == "", err
        assert one_line(err) == f"error: {where}: {expect}; re-run evaluate.py to write it again"
        assert not (tmp_path / "plots").exists()


def test_compare_of_two_header_only_files_is_an_error_not_nan(tmp_path, capsys):
    a = scores_folder(tmp_path / "a", [HEADER])
    b = scores_folder(tmp_path / "b", [HEADER])
    code, out, err = status(evaluate.main, capsys, "--compare", a, b)
    assert code == 2 and "nan" not in out and "no pairs in it" in one_line(err)


def test_compare_still_reports_good_files(tmp_path, capsys):
    a = scores_folder(tmp_path / "a", good_lines())
    code, out, _ = status(evaluate.main, capsys, "--compare", a, a)
    assert code == 0 and "+0.00% accuracy" in out
    keys, labels, folds, scores = metrics.read_scores(a)
    assert len(keys) == 40 and labels.sum() == 20 and scores.dtype == np.float64


def test_out_naming_an_existing_file_is_one_line_and_the_file_is_kept(setup, tmp_path, capsys):
    s = setup
    taken = tmp_path / "taken"
    taken.write_text("mine")
    a = scores_folder(tmp_path / "a", good_lines())
    code, _, err = status(evaluate.main, capsys, "--compare", a, a, "--out", taken)
    assert code == 2 and one_line(err) == (f"error: --out {taken}: a file, not a folder; pass "
                                           "a new or existing folder")
    code, _, err = status(evaluate.main, capsys, s["ckpt"], "--pairs", s["pairs"], "--data",
                          s["images"], "--out", taken)
    assert code == 2 and f"--out {taken}: a file, not a folder" in one_line(err)
    assert taken.read_text() == "mine"


def test_batch_size_zero_is_an_argparse_error(setup, capsys):
    s = setup
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(s["ckpt"]), "--pairs", str(s["pairs"]), "--batch-size", "0"])
    assert e.value.code == 2
    assert "--batch-size: 0 is not 1 or more" in capsys.readouterr().err


def test_the_shipped_model_writes_its_results_outside_the_tracked_models_folder(
        setup, tmp_path, capsys, monkeypatch):
    s = setup
    models = tmp_path / "repo" / "models"  # stands for the repository's tracked models/
    models.mkdir(parents=True)
    shipped = models / "lfw-compact.pt"
    shutil.copy(s["ckpt"], shipped)
    monkeypatch.setattr(m, "SHIPPED", shipped)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # no logs/<run> here: the shipped model is used
    code, out, err = status(evaluate.main, capsys, "--pairs", s["pairs"], "--data", s["images"])
    assert code == 0, err
    code, _, err = status(evaluate.main, capsys, "--pairs", s["pairs"], "--data", s["images"],
                          "--identify")
    assert code == 0, err
    assert sorted(p.name for p in models.iterdir()) == ["lfw-compact.pt"]
    [folder] = (work / "logs").iterdir()
    assert folder.name == f"shipped-lfw-compact-{sha256_file(shipped)[:10]}"
    assert (folder / "eval-pairsDevTest" / "results.json").is_file()
    assert (folder / "eval-identify-pairsDevTest" / "results.json").is_file()
    assert m.newest_checkpoint("logs") is None  # never taken for a training run
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    assert "logs/shipped-<name>-<sha256prefix>" in "".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------- item 11: identify.py

def forge(cache, change):
    saved = torch.load(cache, weights_only=True)
    saved["embeddings"] = change(saved["embeddings"])
    torch.save(saved, cache)


@pytest.mark.parametrize("change", [
    lambda e: torch.randn(len(e), e.shape[1] + 3),  # another shape
    lambda e: e[:-1],                               # fewer rows than photos
    lambda e: torch.full_like(e, float("nan")),
    lambda e: e.index_fill(0, torch.tensor([0]), float("inf")),
    lambda e: torch.zeros_like(e),
], ids=["wide", "short", "nan", "inf", "zero"])
def test_a_forged_cache_with_the_right_checkpoint_hash_is_rebuilt(setup, tmp_path, capsys,
                                                                  change):
    s = setup
    gallery = eileen_and_camera(tmp_path / "g", s)
    args = (gallery, s["astronaut"], "--checkpoint", s["ckpt"], "--json")
    code, out, _ = status(identify.main, capsys, *args)
    assert code == 0
    before = json.loads(out)
    [cache] = gallery.glob(".identify-cache-*.pt")
    good = torch.load(cache, weights_only=True)["embeddings"]
    forge(cache, change)
    code, out, err = status(identify.main, capsys, *args)
    assert code == 0, err
    assert "re-embedding the gallery" in one_line(err) and str(cache) in err
    after = json.loads(out)
    assert [t["person"] for t in after[0]["faces"][0]["top"]] == \
        [t["person"] for t in before[0]["faces"][0]["top"]]
    assert [t["score"] for t in after[0]["faces"][0]["top"]] == \
        pytest.approx([t["score"] for t in before[0]["faces"][0]["top"]], abs=0.02)
    rebuilt = torch.load(cache, weights_only=True)["embeddings"]
    assert rebuilt.shape == good.shape and torch.isfinite(rebuilt).all()
    assert not (rebuilt == 0).all(dim=1).any()
    assert status(identify.main, capsys, *args)[2] == ""  # the rebuilt cache is used quietly


def test_a_newline_or_escape_in_a_name_stays_on_one_line(setup, tmp_path, capsys):
    s = setup
    sneaky, loud = "Eve\nface 9 at [0, 0, 1, 1]: Mallory", "Red\x1b[31mRum"
    gallery = gallery_of(tmp_path / "g", s, {sneaky: [("astronaut", "a.jpg")],
                                             loud: [("camera", "c.jpg")],
                                             "No\rbody": [("blank", "n.jpg")]})
    code, out, err = status(identify.main, capsys, gallery, s["astronaut"], "--checkpoint",
                            s["ckpt"], "--threshold", -1e9)
    assert code == 0, err
    assert "\x1b" not in out + err and "\r" not in out + err
    assert not any(line.lstrip().startswith(("face 9", "Mallory")) for line in out.splitlines())
    assert "Eve\\nface 9 at [0, 0, 1, 1]: Mallory (score" in out and "Red\\x1b[31mRum" in out
    assert one_line(err) == (f"warning: {gallery}/No\\rbody/n.jpg: skipped, no face found")
    code, out, _ = status(identify.main, capsys, gallery, s["astronaut"], "--checkpoint",
                          s["ckpt"], "--threshold", -1e9, "--json")
    people = {t["person"] for t in json.loads(out)[0]["faces"][0]["top"]}
    assert people == {sneaky, loud}  # the JSON keeps the names exactly


def test_the_same_photo_under_two_people_is_reported_and_kept_under_the_first(setup, tmp_path,
                                                                              capsys):
    s = setup
    gallery = gallery_of(tmp_path / "g", s, {"Bob": [("astronaut", "b.jpg")],
                                             "Ann": [("astronaut", "a.jpg")],
                                             "Camera_Man": [("camera", "c.jpg")]})
    code, out, err = status(identify.main, capsys, gallery, s["astronaut"], "--checkpoint",
                            s["ckpt"], "--json")
    assert code == 0, err
    warning = one_line(err)
    assert warning.startswith(f"warning: {gallery / 'Bob' / 'b.jpg'}: skipped, the same photo")
    assert str(gallery / "Ann" / "a.jpg") in warning and "kept under Ann" in warning
    [f] = json.loads(out)[0]["faces"]
    assert [t["person"] for t in f["top"]] == ["Ann", "Camera_Man"]  # no tie with Bob
    code, out, _ = status(identify.main, capsys, gallery, s["astronaut"], "--checkpoint",
                          s["ckpt"])
    assert "2 people in 2 photos with a face (1 skipped)" in out


# ---------------------------------------------------------------- items 1, 3: hostile photos

def test_the_crafted_png_as_a_query_is_one_line_not_a_crash(setup, tmp_path):
    s = setup
    bad = tmp_path / "short.png"
    bad.write_bytes(short_png())
    gallery = eileen_and_camera(tmp_path / "g", s)
    done = run_script("identify.py", gallery, bad, "--checkpoint", s["ckpt"], cwd=tmp_path)
    assert done.returncode not in SEGFAULT, "the decoder crashed identify.py"
    assert done.returncode == 2 and done.stdout == ""
    assert one_line(done.stderr).startswith(f"error: {bad}: a damaged PNG")
    done = run_script("verify.py", bad, s["astronaut"], "--checkpoint", s["ckpt"], cwd=tmp_path)
    assert done.returncode not in SEGFAULT, "the decoder crashed verify.py"
    assert done.returncode == 2 and one_line(done.stderr).startswith(f"error: {bad}: a damaged")


def test_the_crafted_png_in_a_gallery_is_skipped_and_the_rest_works(setup, tmp_path):
    s = setup
    gallery = eileen_and_camera(tmp_path / "g", s)
    bad = gallery / "Eileen" / "short.png"
    bad.write_bytes(short_png())
    done = run_script("identify.py", gallery, s["astronaut"], "--checkpoint", s["ckpt"],
                      "--threshold", -1e9, cwd=tmp_path)
    assert done.returncode not in SEGFAULT, "the decoder crashed identify.py"
    assert done.returncode == 0, done.stderr[-800:]
    assert one_line(done.stderr).startswith(f"warning: {bad}: skipped, a damaged PNG (")
    assert "2 people in 3 photos with a face (1 skipped)" in done.stdout
    assert ": Eileen (score" in done.stdout
    [cache] = gallery.glob(".identify-cache-*.pt")
    saved = torch.load(cache, weights_only=True)
    assert len(saved["hashes"]) == 3 and list(saved["failed"].values())[0].startswith(
        "a damaged PNG")


def animated_gif(*frames):
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=100,
                   loop=0)
    return buf.getvalue()


def test_a_16_bit_png_and_an_animated_gif_in_a_gallery_work(setup, tmp_path, capsys):
    from skimage.data import astronaut, camera
    s = setup
    gallery = tmp_path / "g"
    (gallery / "Eileen").mkdir(parents=True)
    (gallery / "Camera_Man").mkdir()
    (gallery / "Eileen" / "a16.png").write_bytes(png16(astronaut().astype(np.uint16) * 257))
    grey = camera()
    (gallery / "Camera_Man" / "c.gif").write_bytes(  # first frame: him; then her
        animated_gif(np.dstack([grey] * 3), astronaut()[:grey.shape[0], :grey.shape[1]]))
    for query, who in ((s["astronaut"], "Eileen"), (s["camera"], "Camera_Man")):
        code, out, err = status(identify.main, capsys, gallery, query, "--checkpoint",
                                s["ckpt"], "--json")
        assert code == 0 and err == "", err
        [f] = json.loads(out)[0]["faces"]
        assert f["top"][0]["person"] == who
        assert f["top"][0]["score"] == pytest.approx(0, abs=0.02)  # her own photo: cosine 1
    [cache] = gallery.glob(".identify-cache-*.pt")
    saved = torch.load(cache, weights_only=True)
    assert len(saved["hashes"]) == 2 and saved["failed"] == {}


# ---------------------------------------------------------------- item 5: batches by bytes

def plan(sizes, budget):
    return list(identify.detection_batches(enumerate(sizes), budget))


def test_detection_batches_are_capped_by_bytes_not_by_count():
    lfw = faces.detection_bytes(250, 250)
    assert plan([(250, 250)] * 10, 4 * lfw) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan([(250, 250)] * 40, 100 * lfw) == [list(range(40))]  # more than 16 at once
    big = faces.detection_bytes(7000, 7000)  # 49 MP: just under the pixel limit
    assert plan([(7000, 7000)] * 3, big // 2) == [[0], [1], [2]]  # over the budget: alone
    # 16 photos of 4.8 MP took 2.6 GB at once; under the default budget they do not meet.
    photo = faces.detection_bytes(1800, 2667)
    batches = plan([(1800, 2667)] * 16, identify.DETECT_BYTES)
    assert sorted(i for b in batches for i in b) == list(range(16)) and len(batches) > 1
    assert all(len(b) * photo <= identify.DETECT_BYTES for b in batches)


def test_photos_of_many_sizes_never_wait_over_the_budget():
    rng = np.random.default_rng(0)
    shapes = [(250, 250), (480, 640), (1800, 2667), (3000, 4000), (250, 250), (7000, 7000)]
    sizes = [shapes[i] for i in rng.integers(0, len(shapes), 200)]
    budget = 3 * faces.detection_bytes(3000, 4000)
    read, done = [], set()

    def photos():
        for i, size in enumerate(sizes):
            read.append(i)
            yield i, size
    for batch in identify.detection_batches(photos(), budget):
        assert len({sizes[i] for i in batch}) == 1  # one size per MTCNN call
        waiting = [i for i in read[:-1] if i not in done]  # the photo just read aside
        assert sum(faces.detection_bytes(*sizes[i]) for i in waiting) <= budget
        done |= set(batch)
    assert sorted(done) == list(range(len(sizes)))


def test_gallery_detection_calls_stay_under_the_byte_budget(monkeypatch):
    """embed_new through detection_batches: photos decoded lazily (shared zero pixels, so
    the test itself takes no memory), every detector call (FaceModel.faces) under
    DETECT_BYTES."""
    shapes = [(3, 1800, 2667)] * 20 + [(3, 250, 250)] * 30
    calls = []
    pixels = torch.zeros(3, 1, 1, dtype=torch.uint8)
    monkeypatch.setattr(faces, "read_image", lambda path: pixels.expand(*shapes[int(path)]))

    def detect(images):
        calls.append([tuple(img.shape[1:]) for img in images])
        return [(None, {})] * len(images)
    failed = {}
    todo = [(str(i), f"sha{i}") for i in range(len(shapes))]
    fm = SimpleNamespace(faces=detect)  # the part of a FaceModel that embed_new detects with
    identify.embed_new(todo, fm, {}, failed, save=lambda: None)
    assert sum(map(len, calls)) == len(shapes) and len(failed) == len(shapes)
    for call in calls:
        assert len(set(call)) == 1
        assert sum(faces.detection_bytes(*size) for size in call) <= identify.DETECT_BYTES
