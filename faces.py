"""Face detection and alignment, shared by crop_dataset_to_faces.py, verify.py and app.py.

Images travel as uint8 tensors (C, H, W). MTCNN (facenet-pytorch) finds faces and five
landmarks; every crop is one affine warp, so the aligned, box and fallback crops all go
through the same code and a batch is warped in one grid_sample call.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, read_file

# The standard ArcFace 112x112 five-point template: eyes, nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array([
    [38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
    [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)

# Side of the fallback centre crop as a share of the shorter image side. In LFW's 250 px
# photos MTCNN's face boxes are ~100 px wide and centred, so 0.5 frames the face the way a
# box crop with a small margin does.
FALLBACK_FRACTION = 0.5


class FaceError(ValueError):
    """A photo that cannot give a face: unreadable, or no face where one is required."""


def read_image(path):
    """Decode an image file to an RGB uint8 tensor (3, H, W); a clear FaceError if it can't."""
    path = Path(path)
    try:
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB,
                            apply_exif_orientation=True)  # phone photos stand upright
    except (RuntimeError, ValueError, OSError) as e:
        raise FaceError(f"{path}: cannot read it as an image ({str(e).splitlines()[0]}); "
                        "use a JPEG or PNG photo") from None


def decode_bytes(data, name="upload"):
    """Decode image bytes (an upload) the same way as read_image."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as e:
        raise FaceError(f"{name}: not a readable image ({str(e).splitlines()[0]}); "
                        "upload a JPEG or PNG photo") from None


def load_detector(device="cpu", min_face_size=20):
    """MTCNN returning every face, so that we choose which one to keep."""
    from facenet_pytorch import MTCNN  # heavy import, only where detection is needed
    return MTCNN(keep_all=True, device=device, min_face_size=min_face_size)


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


def pick_face(boxes, height, width, rule="center"):
    """Index of the face to keep: nearest the image centre (LFW labels the centred face)
    or the largest (a user's photo)."""
    if rule == "largest":
        return int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return int(np.argmin(((centres - [width / 2, height / 2]) ** 2).sum(1)))


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


def crop_faces(detector, images, size=112, mode="align", margin=0, rule="center"):
    """Detect, choose and crop one face per image (images of one size, batched).

    Returns (crops uint8 (n, 3, size, size), infos), where each info has `found`,
    `n_faces`, `box` and `landmarks` (image coordinates) of the chosen face. An image with
    no face gets the centre crop and found=False; the caller decides whether that is fatal.
    """
    images = list(images)
    matrices, infos = [], []
    for img, det in zip(images, detect(detector, images)):
        h, w = img.shape[1:]
        if det is None:
            matrices.append(centre_matrix(h, w, size))
            infos.append({"found": False, "n_faces": 0, "box": None, "landmarks": None})
            continue
        boxes, _, points = det
        i = pick_face(boxes, h, w, rule)
        m = align_matrix(points[i], size) if mode == "align" else box_matrix(boxes[i], size, margin)
        matrices.append(m)
        infos.append({"found": True, "n_faces": len(boxes), "box": boxes[i].tolist(),
                      "landmarks": points[i].tolist()})
    return warp(images, matrices, size), infos


def face_from_photo(detector, image, size=112, rule="largest"):
    """One aligned face from a photo, or FaceError. Several faces: keep the largest (a user's
    photo) or, with rule="center", the centred one (an LFW photo, as the crops were made)."""
    crops, infos = crop_faces(detector, [image], size=size, mode="align", rule=rule)
    if not infos[0]["found"]:
        raise FaceError("no face found")
    return crops[0], infos[0]
