"""Images and faces: the one image decoder, MTCNN detection and alignment, and the one
function that turns a photo into the face a model expects.

Images travel as uint8 tensors (C, H, W). MTCNN (facenet-pytorch) finds faces and five
landmarks; every crop is one affine warp, so the aligned, box and fallback crops all go
through the same code and a batch is warped in one grid_sample call.

crop_dataset_to_faces.py records the settings that made a crop folder (crop_settings.json);
training copies them into every checkpoint, and face_for_model() rebuilds a new photo's face
with exactly those settings, so an upload reaches the network as the training crops did.
"""
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg

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

def header_pixels(data):
    """Width x height from the image header, without decoding; None if it is not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size[0] * im.size[1]
    except Image.DecompressionBombError as e:  # PIL stops past 2x its own limit; it says the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        return int(found.group(1)) if found else MAX_PIXELS + 1
    except Exception:  # PIL raises many types on bytes that are not an image
        return None


def _reason(e):
    """torchvision's message without its C++ source paths."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # "decode_png, /__w/vision/.../decode_png.cpp:79, Out of bound read in decode_png. ..."
    return re.sub(r"^[\w()]+, \S+\.cpp:\d+, ", "", text).rstrip(" .:")


def decode(data, name="upload"):
    """Image bytes -> RGB uint8 tensor (3, H, W), upright (EXIF orientation applied), or a
    FaceError naming `name`. The pixel count is checked from the header before decoding."""
    pixels = header_pixels(data)
    if pixels is None:
        raise FaceError(f"{name}: not a readable image; use a JPEG or PNG photo")
    if pixels > MAX_PIXELS:
        raise FaceError(f"{name}: {pixels / 1e6:,.0f} megapixels is over the "
                        f"{MAX_PIXELS // 1_000_000} megapixel limit; use a smaller photo")
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as e:
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

def detect(detector, images):
    """Run MTCNN on a list of same-sized images at once.

    Returns, per image, (boxes (n, 4), probs (n,), landmarks (n, 5, 2)) or None if no face.
    """
    batch = torch.stack(list(images)).permute(0, 2, 3, 1).float()  # MTCNN wants NHWC
    with torch.inference_mode():
        boxes, probs, points = detector.detect(batch, landmarks=True)
    # facenet-pytorch hands back object arrays when faces per image differ; make them floats.
    return [None if b is None else tuple(np.asarray(x, dtype=np.float64) for x in (b, p, pt))
            for b, p, pt in zip(boxes, probs, points)]


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
    """Apply per-image 2x3 image->crop matrices with bilinear sampling; uint8 in, uint8 out."""
    images = torch.stack(list(images)).float()
    n, _, h, w = images.shape
    theta = []
    for m in matrices:
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))  # crop pixel -> image pixel
        # grid_sample works in [-1, 1] coordinates on both sides (align_corners=False).
        to_norm = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
        from_norm = np.array([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]])
        theta.append((to_norm @ inv @ from_norm)[:2])
    theta = torch.tensor(np.array(theta), dtype=torch.float32)
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


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
