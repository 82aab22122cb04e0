"""One object for inference: a checkpoint loaded with everything that scores a photo as the
run was validated.

    fm = FaceModel.load("logs/<run>/best_accuracy.pt")  # or None: newest run, else shipped
    crop, info = fm.face(image)          # the face, made as the training crops were made
    emb = fm.embed([crop_a, crop_b])     # at the net's input size, in its precision
    score = fm.score(emb[:1], emb[1:])   # on the scale of fm.threshold

verify.py, identify.py, app.py and evaluate.py all go through it: nothing else reads a
checkpoint's input size, precision or crop settings, so an entry point cannot forget one of
them and score on a different scale from the stored threshold. Why that matters: a net
validated in bf16 but embedded in fp32 (or at another size) gives scores a few hundredths
off, which moves close pairs across the threshold.
"""
from functools import cached_property
from pathlib import Path

import torch

import dataset as ds
import faces
import model as m
import operating_points as op
from runtime import autocast, sha256_file

BATCH = 256  # faces per forward pass: a few hundred MB of activations for the largest net


class FaceModel:
    """A trained network with its checkpoint's precision, input size, crop settings and
    threshold. Build it with FaceModel.load."""

    def __init__(self, net, ckpt, path, device="cpu"):
        self.net, self.ckpt, self.path = net, ckpt, Path(path)
        self.device = torch.device(device)
        self.image_size = int(ckpt["model_config"]["image_size"])
        # Embed in the mixed precision the net was validated in, or its threshold is off.
        self.amp = bool(ckpt.get("config", {}).get("mixed_precision", False))
        self.threshold = float(ckpt["threshold"])

    @classmethod
    def load(cls, given=None, device="cpu", logs="logs"):
        """The checkpoint given (a file or a run folder), else the newest run's, else the
        shipped model; CheckpointError with one line naming the file and the fix."""
        path = m.resolve_checkpoint(given, logs)
        net, ckpt = m.load_checkpoint(path, device)
        return cls(net, ckpt, path, device)

    # --------------------------------------------------------------- what it was trained on

    @cached_property
    def settings(self):
        """The crop settings of its training faces; CheckpointError when it has none (a net
        trained on whole photos cannot be fed a face)."""
        return m.checkpoint_crop_settings(self.ckpt, self.path)

    @cached_property
    def detector(self):
        return faces.detector_for(self.settings, self.device)

    @cached_property
    def sha256(self):
        """The checkpoint file's content hash: what a cache of its embeddings is keyed on."""
        return sha256_file(self.path)

    @property
    def shipped(self):
        return self.path.resolve() == m.SHIPPED.resolve()

    def describe(self, logs="logs"):
        return m.describe_checkpoint(self.path, logs)

    # ------------------------------------------------------------------------ thresholds

    @property
    def operating_points(self):
        """The stored FAR thresholds, or op.NoOperatingPoints naming the fix."""
        return op.stored(self.ckpt, self.path)

    def decision(self, threshold=None, far=None):
        """(threshold, source, what it means) of the same-person rule: a given threshold
        wins ("--threshold"), then the stored one for a false-accept rate ("--far"), then the
        checkpoint's accuracy-optimal one ("checkpoint"). The meaning is a sentence from the
        validation people's pairs (None for a chosen threshold, or for an older checkpoint's
        accuracy threshold); source_text(source, far) says the source in words."""
        if threshold is not None:
            return float(threshold), "--threshold", None
        if far is not None:
            ops = self.operating_points
            point = op.choose(ops, op.check_far(far), self.path)
            return point["threshold"], "--far", op.sentence(point, ops)
        ops = self.ckpt.get("operating_points") or {}
        meaning = op.sentence(ops["accuracy"], ops) if "accuracy" in ops else None
        return self.threshold, "checkpoint", meaning

    # --------------------------------------------------------------------------- faces

    def face(self, image, rule=faces.UPLOAD_RULE):
        """(crop, info) of a photo's face, or faces.FaceError when it has none."""
        return faces.face_for_model(self.detector, image, self.settings, rule)

    def faces(self, images, rule=faces.UPLOAD_RULE):
        """[(crop or None, info)] of same-sized photos, in one detector pass."""
        return faces.faces_for_model(self.detector, images, self.settings, rule)

    def every_face(self, image):
        """[(crop, info)] of every face of one photo, largest first."""
        return faces.every_face_for_model(self.detector, image, self.settings)

    # ------------------------------------------------------------------ embeddings, scores

    @torch.no_grad()
    def embed(self, crops, flip=False, batch_size=BATCH):
        """(N, D) float32 CPU embeddings of uint8 face crops (a list of (3, h, w), or one
        (N, 3, H, W) tensor), fitted to the net's input size."""
        if isinstance(crops, torch.Tensor) and crops.ndim == 4 \
                and crops.shape[-1] == crops.shape[-2] == self.image_size:
            x = crops
        else:
            x = torch.stack([ds.fit(c, self.image_size) for c in crops]) if len(crops) \
                else torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        with autocast(self.amp, self.device):
            return m.embed_images(self.net, x, ds.eval_transform(), batch_size, self.device,
                                  flip)

    @torch.no_grad()
    def score(self, e1, e2):
        """Pair scores of two (N, D) embedding batches (higher = same person)."""
        with autocast(self.amp, self.device):
            return self.net.score(e1.to(self.device), e2.to(self.device)).float().cpu()

    def score_faces(self, face_a, face_b, flip=False):
        """The score of two face crops, as a float."""
        e = self.embed([face_a, face_b], flip)
        return float(self.score(e[:1], e[1:]))

    def prepare_gallery(self, embeddings):
        return self.net.prepare_gallery(embeddings)

    def score_matrix(self, queries, gallery):
        """(M, N) scores of query embeddings against a prepare_gallery() matrix, in fp32:
        autocast would make the cosine matrix product bf16, coarser than validation's
        scores (a learned head's layer ran in bf16 there, a difference of ~1e-3 at most)."""
        return self.net.score_matrix(queries, gallery)

    def score_pairs(self, pairs, images_of, batch_size=BATCH, flip=False):
        """model.score_pairs in this checkpoint's precision: each unique image embedded once."""
        return m.score_pairs(self.net, pairs, images_of, batch_size, self.device, flip,
                             self.amp)


def source_text(source, far=None):
    """A FaceModel.decision's source, as the command-line tools print it."""
    return {"--threshold": "--threshold",
            "--far": f"the checkpoint's threshold for FAR {far:g}" if far else "--far",
            "checkpoint": "the checkpoint's validation threshold, the best-accuracy one"}[source]
