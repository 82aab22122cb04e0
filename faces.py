"""Images and faces: the one image decoder, MTCNN detection and alignment, and the one
function that turns a photo into the face a model expects.

Images travel as uint8 tensors (C, H, W). MTCNN (facenet-pytorch) finds faces and five
landmarks; every crop is one affine warp, so the aligned, box and fallback crops all go
through the same code and a batch is warped in one grid_sample call.

crop_dataset_to_faces.py records the settings that made a crop folder (crop_settings.json);
training copies them into every checkpoint, and face_for_model() rebuilds a new photo's face
with exactly those settings, so an upload reaches the network as the training crops did.
"""
import copy
import io
import json
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
# Image.open(formats=...) knows only registered plugins; these are the formats read here.
from PIL import GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg
from torchvision.transforms import v2

# The standard ArcFace 112x112 five-point template: eyes, nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# Side of the fallback centre crop as a share of the shorter image side. In LFW's 250 px
# photos MTCNN's face boxes are ~100 px wide and centred, so 0.5 frames the face the way a
# box crop with a small margin does.
FALLBACK_FRACTION = 0.5

# One pixel limit for every reader: crops, training, verify.py and the app. A 144 MP photo
# took 83 s and 8.7 GB to decode and detect; the header says its size for free.
MAX_PIXELS = 50_000_000

# MTCNN runs on a copy whose longest side is at most this; faces are then cut from the
# original. Its first pyramid level already shrinks a photo to 12/min_face of its size (0.3
# at min_face 40), so a copy scaled by s, searched with min_face scaled by s, gives that same
# level: nothing is lost while s >= 12/min_face (up to a 6,800 px photo at min_face 40).
# Beyond, the smallest face found is 12/s px: about 50 px at the 50 MP limit. The copy's
# floats cost at most 2048 x 1536 x 3 x 4 bytes (38 MB) per photo, whatever its size.
DETECT_SIDE = 2048
MIN_PYRAMID_FACE = 12  # MTCNN's P-Net window: a smaller min_face would upscale the copy

SETTINGS_FILE = "crop_settings.json"
# What crop_dataset_to_faces.py does unless told otherwise. `rule` is how it picks among
# several faces: LFW labels the face nearest the centre.
CROP_DEFAULTS = {"size": 112, "mode": "align", "margin": 8.0, "min_face": 40,
                 "thresholds": [0.6, 0.7, 0.7], "jpeg_quality": 95, "rule": "center"}
# An upload is not an LFW photo: its subject need not be centred. See pick_face.
UPLOAD_RULE = "main"
RULES = {"center": "the face nearest the centre (as LFW labels its photos)",
         "main": "the most prominent face (the largest visible face, weighted by how whole it "
                 "is, the detector's confidence and nearness to the centre)"}


class FaceError(ValueError):
    """A photo that cannot give a face: unreadable, too large, or no face where one is needed."""


# ------------------------------------------------------------------ the one image decoder

# Who decodes what. JPEG (LFW, phone photos) goes to torchvision's libjpeg-turbo. Every other
# format goes to PIL: libpng inside torchvision kills the whole process (SIGSEGV, which no
# `except` catches) on any damaged pixel data -- a short IDAT, a CRC error, a bad filter byte --
# and torchvision hands back uint16 for a 16-bit PNG and (frames, 3, H, W) for an animated GIF.
NATIVE_FORMATS = ("JPEG", "MPO")  # MPO: a camera JPEG with extra pictures; PIL opens it as JPEG
PIL_FORMATS = ("PNG", "GIF", "WEBP")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by PNG colour type
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2)]  # interlace passes: x start, y start, x step, y step


def probe(data):
    """(format, width x height) from the image header, without decoding; None if it is not
    an image this project reads."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=("JPEG",) + PIL_FORMATS) as im:
                return im.format, im.size[0] * im.size[1]
    except Image.DecompressionBombError as e:  # PIL stops past 2x its own limit; it says the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        return None, int(found.group(1)) if found else MAX_PIXELS + 1
    except Exception:  # PIL raises many types on bytes that are not an image
        return None


def png_rows_bytes(width, height, depth, colour, interlace):
    """How many bytes the header says the decompressed pixel data holds (a filter byte and
    the packed pixels per row, per interlace pass)."""
    bits = depth * PNG_CHANNELS.get(colour, 4)
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if cols > 0 and rows > 0:
            total += rows * (1 + -(-cols * bits // 8))
    return total


def png_damage(data):
    """Why a PNG's pixel data is not whole, or None. PIL pads a short IDAT with black rows
    and skips IDAT checksums, so it is checked here: every chunk's CRC, and that the
    compressed data inflates to at least the bytes the header's size needs (more is ignored,
    as libpng and PIL do). One inflate, streamed and stopped at that count, so memory stays
    small."""
    pos, need, got, inflate = len(PNG_SIGNATURE), None, 0, zlib.decompressobj()
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body, crc = data[pos + 8:pos + 8 + length], data[pos + 8 + length:pos + 12 + length]
        if len(crc) < 4:
            return "the file is cut short"
        if zlib.crc32(kind + body) != int.from_bytes(crc, "big"):
            return f"its {kind.decode('latin-1')} chunk fails its checksum"
        if kind == b"IHDR" and length >= 13:
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            need = png_rows_bytes(width, height, depth, colour, interlace)
        elif kind == b"IDAT" and need is not None:
            try:
                while body and got < need:
                    got += len(inflate.decompress(body, 1 << 20))
                    body = inflate.unconsumed_tail
            except zlib.error:
                return "its pixel data is corrupt"
        elif kind == b"IEND":
            break
        pos += 12 + length
    if need is None:
        return "it has no header"
    if got < need:
        return f"its pixel data holds {got:,} of the {need:,} bytes its {width}x{height} size needs"
    return None


def pil_rgb(data):
    """Decode with PIL: the first frame of an animation, EXIF orientation applied, 16-bit
    samples cut to their high byte (as PIL itself reads 16-bit RGB), alpha dropped (as
    torchvision does). uint8 (3, H, W)."""
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16-bit grey: I;16 or I
            grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            array = np.repeat(grey[:, :, None], 3, axis=2)
        else:
            array = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _reason(e):
    """torchvision's message without its C++ source paths."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # "decode_png, /__w/vision/.../decode_png.cpp:79, Out of bound read in decode_png. ..."
    return re.sub(r"^[\w()]+, \S+\.cpp:\d+, ", "", text).rstrip(" .:")


def decode(data, name="upload"):
    """Image bytes -> RGB uint8 tensor (3, H, W), upright (EXIF orientation applied), or a
    FaceError naming `name`. The pixel count is checked from the header before decoding;
    grey, palette, alpha and 16-bit images all come out 8-bit RGB, animations as their first
    frame."""
    found = probe(data)
    if found is None:
        raise FaceError(f"{name}: not a readable image; use a JPEG or PNG photo")
    kind, pixels = found
    if pixels > MAX_PIXELS:
        raise FaceError(f"{name}: {pixels / 1e6:,.0f} megapixels is over the "
                        f"{MAX_PIXELS // 1_000_000} megapixel limit; use a smaller photo")
    damage = png_damage(data) if kind == "PNG" else None
    if damage:
        raise FaceError(f"{name}: a damaged PNG ({damage}); re-save or re-download it")
    try:
        if kind in NATIVE_FORMATS:
            return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                mode=ImageReadMode.RGB, apply_exif_orientation=True)
        return pil_rgb(data)
    except (RuntimeError, ValueError, OSError, SyntaxError, EOFError) as e:
        raise FaceError(f"{name}: cannot decode it ({_reason(e)}); use a JPEG or PNG "
                        "photo") from None


def read_image(path):
    """decode() of a file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FaceError(f"{path}: cannot read it ({e.strerror or e}); check the path") from None
    return decode(data, path)


# ------------------------------------------------------------------ crop settings

def crop_settings(**given):
    """CROP_DEFAULTS with the given values; unknown names or values are refused."""
    unknown = set(given) - set(CROP_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown crop settings {sorted(unknown)}; known: {sorted(CROP_DEFAULTS)}")
    settings = {**CROP_DEFAULTS, **given}
    if settings["mode"] not in ("align", "bbox") or settings["rule"] not in RULES:
        raise ValueError(f"crop mode must be align or bbox and rule one of {sorted(RULES)}")
    return settings


def read_crop_settings(folder):
    """The settings that made a crop folder, or None (whole photos, or crops made before
    the crop script recorded them)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        return crop_settings(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise FaceError(f"{path}: not valid crop settings ({e}); re-crop with "
                        "`python crop_dataset_to_faces.py --overwrite`") from None


def detector_for(settings, device="cpu"):
    """MTCNN returning every face, so that we choose which one to keep."""
    from facenet_pytorch import MTCNN  # heavy import, only where detection is needed
    return MTCNN(keep_all=True, device=device, min_face_size=settings["min_face"],
                 thresholds=list(settings["thresholds"]))


# ------------------------------------------------------------------ detection and alignment

def detection_size(height, width):
    """(height, width) of the copy MTCNN searches for a photo of this size (see DETECT_SIDE);
    its pixels are what detecting the photo costs, for callers that batch by pixels."""
    scale = min(1.0, DETECT_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def detection_bytes(height, width):
    """About the most bytes detect() holds for one photo of this size, the decoded photo
    included: the uint8 photo, its uint8 copy (twice, resized then batched) and the copy's
    float32 pixels. MTCNN's own pyramid adds under a third of the copy's floats. For callers
    that cap a batch of photos by memory rather than by count."""
    small_height, small_width = detection_size(height, width)
    return 3 * height * width + (3 + 3 + 12) * small_height * small_width


def detect(detector, images):
    """Run MTCNN on a list of same-sized images at once, on copies no larger than
    detection_size(); boxes and landmarks come back in the original's pixels.

    Returns, per image, (boxes (n, 4), probs (n,), landmarks (n, 5, 2)) or None if no face.
    """
    images = list(images)
    height, width = images[0].shape[1:]
    small = detection_size(height, width)
    if small != (height, width):
        images = [v2.functional.resize(img, list(small), antialias=True) for img in images]
        detector = copy.copy(detector)  # shares the networks; the caller's keeps its min_face
        detector.min_face_size = max(MIN_PYRAMID_FACE,
                                     detector.min_face_size * small[0] / height)
    batch = torch.stack(images).permute(0, 2, 3, 1).float()  # MTCNN wants NHWC
    with torch.inference_mode():
        boxes, probs, points = detector.detect(batch, landmarks=True)
    to_original = np.array([width / small[1], height / small[0]])  # x, y
    found = []
    for b, p, pt in zip(boxes, probs, points):
        # facenet-pytorch hands back object arrays when faces per image differ; make floats.
        found.append(None if b is None else
                     (np.asarray(b, dtype=np.float64) * np.tile(to_original, 2),
                      np.asarray(p, dtype=np.float64),
                      np.asarray(pt, dtype=np.float64) * to_original))
    return found


def clip_boxes(boxes, height, width):
    """(n, 4) x1, y1, x2, y2 boxes cut to the photo's edges."""
    return np.column_stack([boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height),
                            boxes[:, 2].clip(0, width), boxes[:, 3].clip(0, height)])


def pick_face(boxes, probs, height, width, rule="center"):
    """Index of the face to keep (see RULES). Boxes are clipped to the photo first: MTCNN
    boxes a bystander cut by the edge far beyond it, and his unclipped box can outsize the
    subject's (George_W_Bush_0020.jpg). "main" scores each face by its visible area, times
    the share of its box inside the photo (a half face warps into a smear), the detector's
    confidence, and a weight falling from 1 at the centre to 0.5 in a corner."""
    boxes = np.asarray(boxes, dtype=np.float64)
    clipped = clip_boxes(boxes, height, width)
    centres = (clipped[:, :2] + clipped[:, 2:]) / 2
    off_centre = np.hypot(centres[:, 0] - width / 2, centres[:, 1] - height / 2) \
        / np.hypot(width / 2, height / 2)  # 0 at the centre, 1 in a corner
    if rule == "center":
        return int(np.argmin(off_centre))
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    whole = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-9)
    return int(np.argmax(visible * (visible / whole) * np.asarray(probs) * (1 - 0.5 * off_centre)))


def similarity_transform(src, dst):
    """Least-squares rotation + uniform scale + shift taking src points to dst (Umeyama 1991).
    Returns a 2x3 matrix."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # no reflections
        d[1] = -1
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    shift = dst_mean - scale * rot @ src_mean
    return np.hstack([scale * rot, shift[:, None]])


def align_matrix(landmarks, size):
    """Image -> crop matrix that puts the five landmarks on the ArcFace template."""
    return similarity_transform(landmarks, ARCFACE_TEMPLATE * size / 112.0)


def box_matrix(box, size, margin):
    """Image -> crop matrix for a square crop around a box, `margin` pixels (in the output)
    on each side, as facenet-pytorch's extract_face does."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    scale = (size - 2 * margin) / side
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]])


def centre_matrix(height, width, size):
    """Fallback when no face is found: a centre square of FALLBACK_FRACTION of the short side."""
    side = FALLBACK_FRACTION * min(height, width)
    return box_matrix((width / 2 - side / 2, height / 2 - side / 2,
                       width / 2 + side / 2, height / 2 + side / 2), size, 0)


def warp(images, matrices, size):
    """Apply per-image 2x3 image->crop matrices with bilinear sampling; uint8 in, uint8 out.
    As grid_sample(mode="bilinear", padding_mode="border", align_corners=False) would, but
    each crop reads only the four pixels around each of its size x size samples, so a face
    costs a few hundred kilobytes of floats however large the photo, never a float copy
    of it (one per face made 24 faces of a 4.8 MP photo take 2.5 GB)."""
    return torch.stack([warp_one(img, m, size) for img, m in zip(images, matrices)])


def warp_one(image, matrix, size):
    """One crop of warp(): sample positions in float64, pixel centres at integers."""
    height, width = image.shape[1:]
    inv = torch.tensor(np.linalg.inv(np.vstack([matrix, [0, 0, 1]])))  # crop -> image
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    x = inv[0, 0] * centres[None, :] + inv[0, 1] * centres[:, None] + inv[0, 2] - 0.5
    y = inv[1, 0] * centres[None, :] + inv[1, 1] * centres[:, None] + inv[1, 2] - 0.5
    # "border": the edge pixel repeats (and a degenerate matrix samples a corner, not NaN)
    x, y = x.nan_to_num(0).clamp(0, width - 1), y.nan_to_num(0).clamp(0, height - 1)
    x0, y0 = x.floor().long(), y.floor().long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    fx, fy = (x - x0).float(), (y - y0).float()

    def at(rows, cols):
        return image[:, rows, cols].float()

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return (top * (1 - fy) + bottom * fy).round().clamp(0, 255).to(torch.uint8)


def face_matrix(box, landmarks, settings):
    """Image -> crop matrix of one detected face in the settings' mode."""
    if settings["mode"] == "align":
        return align_matrix(landmarks, settings["size"])
    return box_matrix(box, settings["size"], settings["margin"])


def crop_faces(detector, images, settings, rule=None):
    """Detect, choose and crop one face per image (images of one size, batched), with the
    crop settings' mode, size and margin; rule defaults to the settings' own.

    Returns (crops uint8 (n, 3, size, size), infos), where each info has `found`,
    `n_faces`, `box` and `landmarks` (image coordinates) of the chosen face. An image with
    no face gets the centre crop and found=False; the caller decides whether that is fatal.
    """
    images, rule, size = list(images), rule or settings["rule"], settings["size"]
    matrices, infos = [], []
    for img, det in zip(images, detect(detector, images)):
        h, w = img.shape[1:]
        if det is None:
            matrices.append(centre_matrix(h, w, size))
            infos.append({"found": False, "n_faces": 0, "box": None, "landmarks": None})
            continue
        boxes, probs, points = det
        i = pick_face(boxes, probs, h, w, rule)
        matrices.append(face_matrix(boxes[i], points[i], settings))
        infos.append({"found": True, "n_faces": len(boxes), "box": boxes[i].tolist(),
                      "landmarks": points[i].tolist(), "prob": float(probs[i])})
    return warp(images, matrices, size), infos


def jpeg_round_trip(crop, quality):
    """What writing the crop to disk and reading it back does to it, as training saw it."""
    return decode_jpeg(encode_jpeg(crop, quality=quality))


def faces_for_model(detector, images, settings, rule=UPLOAD_RULE):
    """The one photo -> face path for new photos (verify.py, the app, identify.py's gallery):
    the face the checkpoint's crop settings make, with the JPEG round trip its training crops
    went through, for same-sized photos in one MTCNN pass. The only rule that differs from
    the crops is which face is kept: `rule` (default UPLOAD_RULE: an upload's subject need not
    be centred), named in each info's `rule_text` so that callers can say it. Returns
    [(crop, info)], crop None where no face was found."""
    crops, infos = crop_faces(detector, images, settings, rule)
    return [(jpeg_round_trip(crop, settings["jpeg_quality"]) if info["found"] else None,
             {**info, "rule": rule, "rule_text": RULES[rule]}) for crop, info in zip(crops, infos)]


def face_for_model(detector, image, settings, rule=UPLOAD_RULE):
    """faces_for_model for one photo: (crop, info), or FaceError if it has no face."""
    crop, info = faces_for_model(detector, [image], settings, rule)[0]
    if crop is None:
        raise FaceError("no face found")
    return crop, info


def every_face_for_model(detector, image, settings):
    """Every face of a photo as the checkpoint expects it (identify.py answers each face of a
    query), largest visible first: a list of (crop, info), empty if there is none."""
    det = detect(detector, [image])[0]
    if det is None:
        return []
    boxes, probs, points = det
    clipped = clip_boxes(boxes, *image.shape[1:])
    order = np.argsort(-(clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]),
                       kind="stable")
    crops = warp([image] * len(order), [face_matrix(boxes[i], points[i], settings) for i in order],
                 settings["size"])
    return [(jpeg_round_trip(crop, settings["jpeg_quality"]),
             {"found": True, "n_faces": len(boxes), "box": boxes[i].tolist(),
              "landmarks": points[i].tolist(), "prob": float(probs[i])})
            for crop, i in zip(crops, order)]
