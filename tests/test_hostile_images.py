"""Hostile images (issue 21): PNGs whose pixel data is damaged (libpng kills the process on
them), 16-bit and animated images, and memory that must not grow with faces or photo size.
The crash cases run in a subprocess, since a native crash kills the process that runs it."""
import csv
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, encode_jpeg

import dataset as ds
import faces

ROOT = Path(__file__).resolve().parent.parent
SEGFAULT = (-11, 139)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]  # the PNG spec's interlace passes: x start, y start, x step, y step


# ---------------------------------------------------------------- image builders

def chunk(kind, body, crc=None):
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc & 0xFFFFFFFF)


def png(width, height, raw, depth=8, colour=2, interlace=0, idat_crc=None):
    """A PNG from its filtered rows `raw` (bytes), with a valid IEND."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (PNG_SIGNATURE + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9), idat_crc) + chunk(b"IEND", b""))


def short_png(width=100, height=100, rows=50):
    """The issue's crafted PNG: a 100x100 RGB header, complete compressed data holding only
    50 rows, a valid IEND. ~100 bytes; torchvision's decode_image segfaults in libpng."""
    return png(width, height, b"".join(b"\0" + bytes(3 * width) for _ in range(rows)))


def rows_of(array, filter_byte=0):
    """Unfiltered PNG rows of an (H, W, C) array (uint8, or uint16 written big-endian)."""
    big = array.astype(">u2") if array.dtype == np.uint16 else array
    return b"".join(bytes([filter_byte]) + row.tobytes() for row in big)


def adam7_png(array):
    """An interlaced 8-bit RGB PNG (PIL cannot write one), to prove valid ones pass."""
    raw = b""
    for x0, y0, dx, dy in ADAM7:
        part = array[y0::dy, x0::dx]
        if part.size:
            raw += rows_of(np.ascontiguousarray(part))
    return png(array.shape[1], array.shape[0], raw, interlace=1)


def png16(array):
    """A 16-bit PNG: (H, W) grey, (H, W, 3) RGB (48-bit) or (H, W, 4) RGBA."""
    grey = array.ndim == 2
    colour = {1: 0, 3: 2, 4: 6}[1 if grey else array.shape[2]]
    return png(array.shape[1], array.shape[0], rows_of(array[:, :, None] if grey else array),
               depth=16, colour=colour)


def saved(image, **options):
    buf = io.BytesIO()
    image.save(buf, **options)
    return buf.getvalue()


def animation(fmt, colours=((255, 0, 0), (0, 255, 0), (0, 0, 255)), size=(64, 48)):
    frames = [Image.new("RGB", size, c) for c in colours]
    return saved(frames[0], format=fmt, save_all=True, append_images=frames[1:], duration=100,
                 loop=0)


def damaged_pngs():
    """{name: bytes}: the crafted PNG and its kin, each of which segfaults torchvision."""
    whole = rows_of(np.full((40, 40, 3), 7, np.uint8))
    return {
        "short.png": short_png(),
        "short_interlaced.png": png(100, 100, b"".join(b"\0" + bytes(300) for _ in range(50)),
                                    interlace=1),
        "short_grey16.png": png(100, 100, b"".join(b"\0" + bytes(200) for _ in range(10)),
                                depth=16, colour=0),
        "no_rows.png": png(100, 100, b""),
        "bad_checksum.png": png(40, 40, whole, idat_crc=1),
        "bad_filter.png": png(40, 40, rows_of(np.full((40, 40, 3), 7, np.uint8), filter_byte=9)),
        "corrupt_zlib.png": (PNG_SIGNATURE
                             + chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 8, 2, 0, 0, 0))
                             + chunk(b"IDAT", zlib.compress(whole)[:8] + bytes(range(200)))
                             + chunk(b"IEND", b"")),
    }


def run_python(code, *args, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---------------------------------------------------------------- item 1: damaged PNGs

READ_EACH = (
    "import sys, faces\n"
    "for path in sys.argv[1:]:\n"
    "    try:\n"
    "        faces.read_image(path)\n"
    "        print('decoded', path)\n"
    "    except faces.FaceError as e:\n"
    "        print(e)\n")


def test_the_crafted_png_is_about_100_bytes_and_pil_reads_it():
    data = short_png()
    assert len(data) < 120
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # PIL pads the missing rows with black: no error, so faces.decode checks
        assert im.size == (100, 100)


def test_damaged_pngs_give_one_line_each_and_never_kill_the_process(tmp_path):
    paths = []
    for name, data in damaged_pngs().items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    done = run_python(READ_EACH, *paths)
    assert done.returncode not in SEGFAULT, "the decoder crashed the process"
    assert done.returncode == 0, done.stderr[-800:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        assert line.startswith(f"{path}: "), line
        assert "; " in line and ".cpp" not in line  # what is wrong; what to do
    by_name = dict(zip([p.name for p in paths], lines))
    assert "a damaged PNG (its pixel data holds 15,050 of the 30,100 bytes its 100x100 size " \
           "needs); re-save or re-download it" in by_name["short.png"]
    assert "IDAT chunk fails its checksum" in by_name["bad_checksum.png"]
    assert "cannot decode it" in by_name["bad_filter.png"]  # whole, but PIL refuses it


def test_the_crop_skips_the_crafted_png_with_a_reason_and_resumes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    (src / "Mallory").mkdir(parents=True)
    (src / "Mallory" / "Mallory_0001.png").write_bytes(short_png())
    (src / "Nobody").mkdir()
    blank = torch.full((3, 120, 120), 128, dtype=torch.uint8)
    (src / "Nobody" / "Nobody_0001.jpg").write_bytes(encode_jpeg(blank).numpy().tobytes())
    argv = ["crop_dataset_to_faces.py", "--src", src, "--dst", dst, "--workers", "1"]
    crop = ("import runpy, sys\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    for attempt in ("first run", "resume"):
        done = run_python(crop, *argv)
        assert done.returncode not in SEGFAULT, f"{attempt}: the crop crashed"
        assert done.returncode == 0, f"{attempt}: {done.stderr[-800:]}"
        assert "1 skipped files are listed" in done.stdout, done.stdout
        with open(dst / "report.csv", newline="") as f:
            reasons = {r["file"]: r["reason"] for r in csv.DictReader(f)}
        assert reasons["Mallory/Mallory_0001.png"].startswith("skipped: ")
        assert "a damaged PNG" in reasons["Mallory/Mallory_0001.png"]
        assert (dst / "Nobody" / "Nobody_0001.jpg").exists()
        assert not (dst / "Mallory" / "Mallory_0001.jpg").exists()


def test_training_names_the_damaged_file_instead_of_dying(tmp_path):
    bad = tmp_path / "P" / "P_0001.png"
    bad.parent.mkdir()
    bad.write_bytes(short_png())
    code = ("import sys, dataset as ds\n"
            "try:\n"
            "    ds.ImageBank([sys.argv[1]], 32)\n"
            "except ds.ProtocolError as e:\n"
            "    print(e)\n")
    done = run_python(code, bad)
    assert done.returncode not in SEGFAULT and done.returncode == 0, done.stderr[-800:]
    assert done.stdout.startswith(f"{bad}: a damaged PNG")
    assert "crop_dataset_to_faces.py --overwrite" in done.stdout


def valid_pngs():
    """{name: (bytes, what PIL decodes it to as RGB)} for PNGs that must still decode."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (33, 47, 3), dtype=np.uint8)
    cases = {mode: saved(Image.fromarray(rgb).convert(mode), format="PNG")
             for mode in ("1", "L", "LA", "P", "RGB", "RGBA")}
    cases["P_4bit"] = saved(Image.fromarray(rgb).convert("P", colors=16), format="PNG", bits=4)
    cases["interlaced"] = adam7_png(rgb)
    cases["extra_data"] = png(47, 33, rows_of(rgb) + bytes(100))  # libpng and PIL ignore it
    return cases


@pytest.mark.parametrize("name", sorted(valid_pngs()))
def test_whole_pngs_of_every_kind_decode_as_before(name):
    data = valid_pngs()[name]
    ours = faces.decode(data, name)
    before = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                          mode=ImageReadMode.RGB)  # whole 8-bit PNGs do not crash libpng
    assert ours.dtype == torch.uint8 and ours.shape == (3, 33, 47)
    assert torch.equal(ours, before)


def test_a_png_still_gets_its_exif_orientation():
    array = np.zeros((40, 60, 3), np.uint8)
    array[:, :10] = 255  # a white band on the stored image's left; orientation 6 puts it on top
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = faces.decode(saved(Image.fromarray(array), format="PNG", exif=exif), "phone.png")
    assert upright.shape == (3, 60, 40) and upright[:, :10].float().mean() == 255


def test_the_png_check_counts_rows_as_libpng_does():
    for w, h in [(1, 1), (7, 5), (100, 100), (33, 47)]:
        for depth, colour in [(1, 0), (4, 3), (8, 2), (16, 6), (8, 4)]:
            bits = depth * faces.PNG_CHANNELS[colour]
            assert faces.png_rows_bytes(w, h, depth, colour, 0) == h * (1 + -(-w * bits // 8))
    assert faces.png_rows_bytes(100, 100, 8, 2, 1) == 30188  # Adam7: seven passes' rows


# ---------------------------------------------------------------- item 3: 16-bit, animations

def test_16_bit_pngs_decode_to_8_bit_rgb():
    grey = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    rgb = np.zeros((48, 64, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 100 * 256 + 7, 3
    for name, data, first in [("grey16.png", png16(grey), [0, 0, 0]),
                              ("rgb48.png", png16(rgb), [255, 100, 0]),
                              ("rgba64.png", png16(np.dstack([rgb, rgb[..., :1]])), [255, 100, 0])]:
        image = faces.decode(data, name)
        assert image.dtype == torch.uint8 and image.shape == (3, 48, 64), name
        assert image[:, 0, 0].tolist() == first, name
    image = faces.decode(png16(grey), "grey16.png")
    assert torch.equal(image[0], torch.from_numpy((grey >> 8).astype(np.uint8)))  # high byte
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_an_animation_decodes_to_its_first_frame(fmt):
    image = faces.decode(animation(fmt), f"moving.{fmt.lower()}")
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 64)
    assert (image[:, 10, 10].int() - torch.tensor([255, 0, 0])).abs().max() <= 3  # red, frame 1


def test_grey_palette_and_alpha_images_come_out_rgb():
    for mode in ("L", "P", "LA", "RGBA", "1"):
        image = faces.decode(saved(Image.new(mode, (20, 10)), format="PNG"), mode)
        assert image.shape == (3, 10, 20) and image.dtype == torch.uint8
    assert faces.decode(saved(Image.new("L", (20, 10), 77), format="GIF"), "g").shape == (3, 10, 20)


def test_training_reads_16_bit_and_animated_files(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.gif"]
    paths[0].write_bytes(png16(np.full((40, 30, 3), 60000, np.uint16)))
    paths[1].write_bytes(animation("GIF"))
    bank = ds.ImageBank(paths, 32)
    for p in paths:
        assert bank[p].dtype == torch.uint8 and bank[p].shape == (3, 32, 32)
    assert bank[paths[0]][:, 16, 16].tolist() == [234, 234, 234]  # 60000 >> 8


# ---------------------------------------------------------------- item 5: memory per face

def grid_sample_warp(images, matrices, size):
    """The warp faces.py used before issue 21 (a float copy of the photo per face), kept
    here as the reference its replacement must match."""
    images = torch.stack(list(images)).float()
    n, _, h, w = images.shape
    theta = []
    for m in matrices:
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
        to_norm = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
        from_norm = np.array([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]])
        theta.append((to_norm @ inv @ from_norm)[:2])
    theta = torch.tensor(np.array(theta), dtype=torch.float32)
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def test_warp_matches_grid_sample_inside_and_across_the_borders():
    from skimage.data import astronaut
    photo = torch.from_numpy(astronaut()).permute(2, 0, 1).contiguous()
    lfw_size = F.interpolate(photo[None].float(), size=(250, 250), mode="area")[0] \
        .round().to(torch.uint8)
    rng = np.random.default_rng(1)
    for image in (photo, lfw_size):
        h, w = image.shape[1:]
        crops = [(faces.box_matrix((w * 0.3, h * 0.2, w * 0.6, h * 0.55), 112, 8), 112),
                 (faces.centre_matrix(h, w, 112), 112),
                 (faces.box_matrix((-w * 0.2, -h * 0.1, w * 0.2, h * 0.3), 112, 0), 112),  # edge
                 (faces.box_matrix((w * 0.9, h * 0.9, w * 1.4, h * 1.4), 96, 4), 96)]  # off it
        for _ in range(4):  # rotated, scaled similarity transforms like align_matrix makes
            landmarks = faces.ARCFACE_TEMPLATE * rng.uniform(0.8, 3) + rng.uniform(0, 0.6 * w)
            angle = rng.uniform(-0.6, 0.6)
            rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            crops.append((faces.align_matrix(landmarks @ rot.T, 112), 112))
        ours = torch.cat([faces.warp([image], [m], size).flatten() for m, size in crops])
        ref = torch.cat([grid_sample_warp([image], [m], size).flatten() for m, size in crops])
        diff = (ours.int() - ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005  # float rounding only


def peak_torch_bytes(fn):
    """The most bytes of torch tensors alive at once while fn runs (tracemalloc does not see
    torch's allocator; the profiler records each allocation and free)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


class GridOfFaces:
    """A detector stub: n faces on a grid of the image it is given, boxes and five landmarks
    in that image's pixels, as MTCNN returns them. Records the min_face it was run with."""

    def __init__(self, n):
        self.n, self.min_face_size, self.seen = n, 40, []

    def detect(self, batch, landmarks=True):
        _, h, w, _ = batch.shape
        self.seen.append(((h, w), self.min_face_size))
        side, cols = w / 10, 6
        boxes, points = [], []
        for i in range(self.n):
            x, y = (i % cols + 1) * 1.5 * side, (i // cols + 1) * 1.5 * side
            boxes.append([x, y, x + side, y + side * 1.2])
            points.append([x, y] + (faces.ARCFACE_TEMPLATE - [20, 30]) * side / 75)
        return ([np.array(boxes)] * len(batch), [np.full(self.n, 0.99)] * len(batch),
                [np.array(points)] * len(batch))


@pytest.fixture(scope="module")
def big_photo():
    return torch.randint(0, 256, (3, 3000, 4000), dtype=torch.uint8)  # 12 MP, 36 MB


def test_detection_runs_on_a_bounded_copy_and_boxes_come_back_in_the_photos_pixels(big_photo):
    stub = GridOfFaces(1)
    (box, _, points), = faces.detect(stub, [big_photo])
    (size, min_face), = stub.seen
    assert size == (1536, 2048) == faces.detection_size(3000, 4000)
    assert min_face == pytest.approx(40 * 2048 / 4000)  # the same face sizes are searched
    assert stub.min_face_size == 40  # the caller's detector is not changed
    assert box[0, 0] == pytest.approx(1.5 * 204.8 * 4000 / 2048)
    assert points.shape == (1, 5, 2)
    small = torch.zeros((3, 250, 250), dtype=torch.uint8)
    stub = GridOfFaces(1)
    faces.detect(stub, [small])
    assert stub.seen == [((250, 250), 40)]  # LFW-sized photos: exactly as before


def test_memory_does_not_grow_with_faces_or_hold_a_float_photo(big_photo):
    settings = faces.crop_settings()
    h, w = big_photo.shape[1:]
    float_photo = 4 * big_photo.numel()  # 144 MB: what every face used to cost
    one = peak_torch_bytes(lambda: faces.every_face_for_model(GridOfFaces(1), big_photo, settings))
    assert one < float_photo / 2, f"{one / 1e6:.0f} MB for one face"
    assert one <= faces.detection_bytes(h, w) - big_photo.numel() + 2e6  # photo already held
    many = peak_torch_bytes(lambda: faces.every_face_for_model(GridOfFaces(12), big_photo,
                                                               settings))
    assert many - one < 11 * 0.5e6, f"{one / 1e6:.0f} MB for one face, {many / 1e6:.0f} for 12"
    batch = peak_torch_bytes(lambda: faces.faces_for_model(GridOfFaces(12), [big_photo] * 2,
                                                           settings))
    assert batch < float_photo, f"{batch / 1e6:.0f} MB for two photos"
