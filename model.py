"""Siamese networks for face verification: the network, its config and its checkpoints.

A backbone (backbones.py's registry) maps an image to an embedding. SiameseNet.embed runs
it once per image and SiameseNet.score turns two embeddings into a pair score (higher = same
person), as the loss declares (losses.py's registry), so that evaluation embeds each image
once and scores pairs from cached embeddings. Checkpoints are read and found here; scoring a
photo with one is inference.py's FaceModel.
"""
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import losses

# What every network has, whatever its backbone; each backbone's own settings are in its
# registry entry (backbones.py), each loss's in losses.py.
CHOICES = {"distance": ("l1", "cosine"), "init": ("default", "kaiming", "xavier", "koch")}
GENERAL = ("model", "image_size", "loss", "distance", "init")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that rebuilds a network: the general fields and the backbone's own
    settings. A checkpoint stores it flat (to_dict). The values are checked here, once."""
    model: str
    image_size: int
    loss: str
    distance: str
    init: str
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model not in backbones.BACKBONES:
            raise ValueError(f"model={self.model!r} is not one of {', '.join(backbones.BACKBONES)}")
        if self.loss not in losses.LOSSES:
            raise ValueError(f"loss={self.loss!r} is not one of {', '.join(losses.LOSSES)}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.image_size < 1:
            raise ValueError(f"image_size={self.image_size} must be positive")
        backbones.BACKBONES[self.model].check(self.settings)

    def get(self, name):
        return self.settings[name]

    def to_dict(self):
        return {**{k: getattr(self, k) for k in GENERAL}, **self.settings}

    @classmethod
    def from_dict(cls, values):
        """From a trainer config or a checkpoint's model_config: the general fields, and the
        backbone's settings as given or else their registry defaults. Other keys are ignored."""
        missing = [k for k in GENERAL if k not in values]
        if missing:
            raise ValueError(f"no {', '.join(missing)} in the model settings")
        entry = backbones.BACKBONES.get(values["model"])
        own = {k: values.get(k, default) for k, (default, _) in entry.settings.items()} \
            if entry else {}
        return cls(**{k: values[k] for k in GENERAL}, settings=own)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit this model.py; one clear line."""


# ------------------------------------------------------------------------------ siamese net

class SiameseNet(nn.Module):
    """embed(x) -> embeddings; score(e1, e2) -> pair scores; forward(x1, x2) -> scores.

    Pairs are scored as the loss declares (losses.py): by a head trained with it (bce: a
    linear layer on |e1 - e2| or on the cosine similarity, a logit), or else by the cosine
    similarity or minus the L1 distance. Higher always means more likely the same person.
    """

    def __init__(self, backbone, head=None, distance="l1"):
        super().__init__()
        self.backbone, self.head, self.distance = backbone, head, distance

    def embed(self, x):
        return self.backbone(x)

    def score(self, e1, e2):
        if self.head is not None:
            return self.head.score(e1, e2)
        return -losses.pair_distance(e1, e2, self.distance)

    def forward(self, x1, x2=None):
        """Pair scores, or embeddings when given one batch (so DDP sees every call)."""
        if x2 is None:
            return self.embed(x1)
        e = self.embed(torch.cat([x1, x2]))  # one pass over both halves
        return self.score(*e.chunk(2))

    def prepare_gallery(self, embeddings):
        """The matrix score_matrix searches, made once per gallery: L2-normalised rows for a
        cosine net, the embeddings as they are for an L1 one."""
        return F.normalize(embeddings.float(), dim=1) if self.distance == "cosine" \
            else embeddings.float()

    @torch.no_grad()
    def score_matrix(self, queries, gallery):
        """(M, N) pair scores of M query embeddings against a prepare_gallery() matrix:
        exactly score(query, photo) for every pair, on the scale of the checkpoint's
        threshold, as one matrix product for cosine nets (cdist for L1 ones) and in chunks of
        pairs for an L1 head."""
        queries = queries.float().to(gallery.device)
        if self.distance == "cosine":
            cos = F.normalize(queries, dim=1) @ gallery.T
            if self.head is None:
                return cos - 1
            device = self.head.weight.device
            return self.head.logit(cos.unsqueeze(-1).to(device)).float().cpu()
        if self.head is None:
            return -torch.cdist(queries, gallery, p=1)
        n, device = len(gallery), self.head.weight.device
        flat = torch.arange(len(queries) * n)
        return torch.cat([self.score(queries[idx // n].to(device), gallery[idx % n].to(device))
                          .float().cpu() for idx in flat.split(SCORE_CHUNK)]
                         ).view(len(queries), n) if len(flat) else torch.empty(len(queries), n)


@torch.no_grad()
def embed_images(net, images, transform, batch_size=256, device="cpu", flip=False):
    """Embeddings of a uint8 image tensor (N, 3, H, W), in batches. flip=True adds the
    embedding of the mirrored image (flip test-time augmentation)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = transform(images[i:i + batch_size]).to(device)
        e = net.embed(x)
        if flip:
            e = e + net.embed(x.flip(3))
        out.append(e.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


SCORE_CHUNK = 8192  # pairs scored per call: bounds memory with 4096-d Koch embeddings


def unique_images(pairs, paths=None):
    """(sorted unique paths, index_a, index_b) of [(path_a, path_b, ...)] pairs (into the
    given paths, a superset, if any)."""
    paths = paths if paths is not None else sorted({p for pair in pairs for p in pair[:2]})
    index = {p: i for i, p in enumerate(paths)}
    return (paths, torch.tensor([index[pair[0]] for pair in pairs], dtype=torch.long),
            torch.tensor([index[pair[1]] for pair in pairs], dtype=torch.long))


@torch.no_grad()
def score_pairs(net, pairs, images_of, batch_size=256, device="cpu", flip=False, amp=False,
                also=()):
    """The one way pairs are scored (validation, evaluate.py, the benchmark): embed every
    unique image once, then score every pair from the cached embeddings in vectorised chunks.

    pairs: [(path_a, path_b, ...)]; images_of(paths) -> uint8 (N, 3, H, W) at the net's input
    size. amp: embed in the mixed precision the net was trained and validated in, so that
    scores match its threshold. also: more image paths to embed in the same pass (their
    embeddings are returned; no pair scored). Returns a dict: scores (numpy), embeddings, a
    and b (index tensors into them), paths, images and the seconds spent decoding, embedding
    and scoring.
    """
    import dataset  # the input pipeline lives there; imported here to keep model.py light
    from runtime import autocast
    device = torch.device(device)
    paths, a, b = unique_images(pairs)
    if also:  # re-index: paths stay sorted and unique
        paths = sorted(set(paths) | set(also))
        _, a, b = unique_images(pairs, paths)
    t0 = time.perf_counter()
    images = images_of(paths)
    t1 = time.perf_counter()
    with autocast(amp, device):
        emb = embed_images(net, images, dataset.eval_transform(), batch_size, device, flip)
        t2 = time.perf_counter()
        scores = torch.cat([net.score(emb[a[i:i + SCORE_CHUNK]].to(device),
                                      emb[b[i:i + SCORE_CHUNK]].to(device)).float().cpu()
                            for i in range(0, len(a), SCORE_CHUNK)]) if len(a) else torch.empty(0)
    return {"scores": scores.numpy(), "embeddings": emb, "a": a, "b": b, "paths": paths,
            "images": images, "seconds": {"decode": t1 - t0, "embed": t2 - t1,
                                          "score": time.perf_counter() - t2}}


class EnsembleBackbone(nn.Module):
    """Trained backbones as one (ensemble.py): each member's embedding in its own precision,
    L2-normalised, the k concatenated and scaled by 1/sqrt(k), so that the cosine of two
    ensemble embeddings is the mean of the members' cosines."""

    def __init__(self, members, precision):
        super().__init__()
        self.members, self.precision = nn.ModuleList(members), list(precision)
        self.out_dim = sum(member.out_dim for member in members)

    def forward(self, x):
        from runtime import autocast
        parts = []
        for member, amp in zip(self.members, self.precision):
            with autocast(amp, x.device):
                parts.append(F.normalize(member(x).float(), dim=1))
        return torch.cat(parts, dim=1) / len(parts) ** 0.5

    def pretrained_parameters(self):
        return []


class MetricBackbone(nn.Module):
    """A trained backbone with a learned metric after it (fit_metric.py, metric_learning.py):
    its embedding, in its own precision and L2-normalised, centred and mapped by a fitted
    linear projection, so that the cosine of two mapped embeddings is the learned score."""

    def __init__(self, base, precision, dim):
        super().__init__()
        self.base, self.precision, self.out_dim = base, bool(precision), int(dim)
        self.register_buffer("mean", torch.zeros(base.out_dim))
        self.register_buffer("proj", torch.zeros(base.out_dim, self.out_dim))

    def forward(self, x):
        from runtime import autocast
        with autocast(self.precision, x.device):
            e = F.normalize(self.base(x).float(), dim=1)
        return (e - self.mean) @ self.proj

    def pretrained_parameters(self):
        return []


def build_model(cfg, pretrained=False):
    """A SiameseNet from a ModelConfig (or a dict with its keys): the backbone from its
    registry entry, the pair head the loss declares. pretrained: start the backbone from
    its outside weights (training only; a checkpoint brings its own weights). An ensemble's
    model_config (ensemble.py) lists its members' configs under "members", a learned metric's
    (fit_metric.py) its base net's under "base"."""
    if isinstance(cfg, dict) and cfg.get("model") == "ensemble":
        members = [build_model(c).backbone for c in cfg["members"]]
        return SiameseNet(EnsembleBackbone(members, cfg["member_precision"]), None, "cosine")
    if isinstance(cfg, dict) and cfg.get("model") == "metric":
        base = build_model(cfg["base"]).backbone
        return SiameseNet(MetricBackbone(base, cfg["base_precision"], cfg["dim"]), None, "cosine")
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)
    backbone = backbones.BACKBONES[cfg.model].build(cfg, pretrained)
    head = losses.LOSSES[cfg.loss].pair_head(backbone.out_dim, cfg.distance)
    return SiameseNet(backbone, head, cfg.distance)


def read_torch_file(path, fix, device="cpu", mmap=False):
    """torch.load with weights_only=True, or a CheckpointError that names the file, says why
    in this project's words and gives the fix."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's own text advises weights_only=False: never here
        why = "it holds Python objects besides weights, which are refused because loading " \
              "them could run code"
    except FileNotFoundError:
        why = "no such file"
    except Exception:  # torch.load fails in many ways on a truncated or foreign file
        why = "it is truncated or not a PyTorch file"
    raise CheckpointError(f"{path}: cannot load it ({why}); {fix}")


def load_checkpoint(path, device="cpu"):
    """Rebuild a network from a checkpoint alone. Returns (net in eval mode, checkpoint), or
    raises CheckpointError with one line that names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train one with `python trainer2.py`")
    ckpt = read_torch_file(path, "pass a best_*.pt written by trainer2.py", device)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict):
        raise CheckpointError(f"{path}: not a checkpoint written by training (no model_config); "
                              "pass a best_*.pt written by trainer2.py")
    try:
        net = build_model(ckpt["model_config"])
        net.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: its weights do not fit the network model.py builds for "
                              "its model_config; use the version of model.py it was trained "
                              f"with (commit {ckpt.get('git_commit', 'unknown')})") from None
    return net.to(device).eval(), ckpt


def checkpoint_crop_settings(ckpt, path):
    """The crop settings of the faces a checkpoint was trained on (faces.py), so that a new
    photo's face is made the same way. A net trained on whole photos, or on a folder without
    crop_settings.json, cannot be fed a face."""
    import faces  # detection lives there; imported here to keep model.py light
    if ckpt.get("crop"):
        return faces.crop_settings(**ckpt["crop"])
    cfg = ckpt.get("config", {})
    raise CheckpointError(f"{path}: trained on {cfg.get('data_dir', 'a folder')}, which holds "
                          f"no {faces.SETTINGS_FILE} (whole photos, as trainer.py uses, or crops "
                          "made before the crop script recorded its settings), so its faces "
                          "cannot be rebuilt here; train on crops from "
                          "`python crop_dataset_to_faces.py` (trainer2.py does)")


# ------------------------------------------------------------------------------ finding checkpoints

def checkpoint_row(path, run=None):
    """What a chooser shows of one checkpoint: path, run, the metric it is best at, model,
    loss, distance, image size, epoch, validation accuracy, threshold and mtime. Reads the
    metadata with mmap, without pulling every weight into memory; raises if it cannot."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    cfg = ckpt["model_config"]
    return {"path": path, "run": run or path.parent.name,
            "best": path.stem[len("best_"):] if path.stem.startswith("best_") else path.stem,
            "model": cfg["model"], "loss": cfg.get("loss"), "distance": cfg.get("distance"),
            "image_size": cfg["image_size"], "epoch": ckpt.get("epoch"),
            "accuracy": ckpt["metrics"].get("accuracy"), "threshold": ckpt["threshold"],
            "mtime": path.stat().st_mtime}


def list_checkpoints(logs="logs"):
    """checkpoint_row of every logs/<run>/best_*.pt, newest first. Files that do not load as
    checkpoints are left out."""
    rows = []
    for path in Path(logs).glob("*/best_*.pt"):
        try:
            rows.append(checkpoint_row(path))
        except Exception:  # torch.load fails in many ways on a half-written or foreign file
            continue
    return sorted(rows, key=lambda r: r["mtime"], reverse=True)


def newest_checkpoint(logs="logs", name="best_accuracy.pt"):
    """The most recently written logs/<run>/best_accuracy.pt, or None if there is none: the
    one way every script and the demo find "the newest run"."""
    paths = list(Path(logs).glob(f"*/{name}"))
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


SHIPPED = Path(__file__).resolve().parent / "models" / "lfw-compact.pt"


def resolve_checkpoint(given=None, logs="logs"):
    """The checkpoint a user means: a file as given, a run folder's best_accuracy.pt, or with
    nothing given the newest run's, else the model shipped in models/ (a run of one's own
    takes precedence). CheckpointError (one line, with the fix) if none."""
    if given:
        path = Path(given)
        return path / "best_accuracy.pt" if path.is_dir() else path
    path = newest_checkpoint(logs)
    if path is None and SHIPPED.is_file():
        return SHIPPED
    if path is None:
        raise CheckpointError(f"no checkpoint: {logs}/ holds no <run>/best_accuracy.pt; train "
                              "one with `make train` or `python trainer2.py`, or pass one")
    return path


def describe_checkpoint(path, logs="logs"):
    """The first line a script prints: which model answers, and why that one."""
    if Path(path).resolve() == SHIPPED:
        return f"model: the shipped {SHIPPED.parent.name}/{SHIPPED.name} ({logs}/ holds no " \
               "run of your own; see models/MODEL_CARD.md)"
    return f"model: {path}"


# The training settings an export keeps: its precision, and what rebuilds its split.
EXPORTED_CONFIG = ("mixed_precision", "data_dir", "split", "seed", "val_fraction", "val_pairs",
                   "slice_of_data", "fold")


def export_weights(ckpt, path, source=None):
    """A checkpoint as a small file to ship: weights only, in half precision, plus what
    rebuilding the network and its faces needs and what it was validated at."""
    from runtime import write_atomic
    small = {"model": {k: v.half() if v.is_floating_point() else v
                       for k, v in ckpt["model"].items()},
             "model_config": ckpt["model_config"], "crop": ckpt.get("crop"),
             "threshold": ckpt["threshold"], "metrics": ckpt["metrics"],
             "epoch": ckpt.get("epoch"), "train_people": ckpt.get("train_people", []),
             "val_people": ckpt.get("val_people", []),
             "operating_points": ckpt.get("operating_points"),
             "config": {k: ckpt["config"][k] for k in EXPORTED_CONFIG
                        if k in ckpt.get("config", {})},
             "source": ckpt.get("source", source), "git_commit": ckpt.get("git_commit"),
             "shipped": True}
    write_atomic(path, write=lambda tmp: torch.save(small, tmp))
