"""Siamese networks for face verification: backbones, pair scoring and losses.

A backbone maps an image to an embedding. SiameseNet.embed runs it once per image and
SiameseNet.score turns two embeddings into a pair score (higher = same person), so that
evaluation embeds each image once and scores pairs from cached embeddings.
"""
import pickle
import time
import urllib.error
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

CHOICES = {"model": ("koch", "compact", "resnext"),
           "loss": ("bce", "contrastive", "triplet", "arcface"),
           "distance": ("l1", "cosine"), "activation": ("sigmoid", "relu"),
           "init": ("default", "kaiming", "xavier", "koch")}


@dataclass(frozen=True)
class ModelConfig:
    """Everything that rebuilds a network, with its defaults in one place; a checkpoint
    stores it whole (asdict). Every other trainer hyperparameter only affects training.
    The values are checked here, once, when a config is made."""
    model: str = "compact"      # koch (Koch et al. 2015), compact (small ResNet), resnext
    image_size: int = 112
    embedding_dim: int = 256    # compact only
    width: int = 0              # koch, compact: first-stage channels (0: the model's own, 64, 32)
    loss: str = "arcface"       # bce scores pairs with a learnt head; the others by distance
    distance: str = "cosine"
    drop_layer4: bool = False   # resnext only
    head_hidden: int = 1024     # resnext only
    head_depth: int = 1         # resnext only
    activation: str = "sigmoid"  # resnext head
    p: float = 0.0              # dropout before the embedding (koch, compact) or in the head
    init: str = "kaiming"       # for layers without pretrained weights

    def __post_init__(self):
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if min(self.image_size, self.embedding_dim) < 1 or self.width < 0 or not 0 <= self.p < 1:
            raise ValueError("image_size and embedding_dim must be positive, width 0 or more "
                             "and p in [0, 1)")

    @classmethod
    def from_dict(cls, values):
        """From a trainer config or a checkpoint's model_config; other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))


class PretrainedWeightsMissing(RuntimeError):
    pass


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit this model.py; one clear line."""


# ------------------------------------------------------------------------------ backbones

class KochNet(nn.Module):
    """Koch et al. 2015: four conv layers, then a 4096-unit sigmoid layer. The flatten size
    is computed from the input size, so any image_size works. width scales every layer (the
    paper's is 64: 64-128-128-256 channels, 4096 units); p is dropout before the last layer."""

    def __init__(self, image_size=105, width=64, p=0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 10), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 7), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 4), nn.ReLU(inplace=True), nn.Flatten())
        with torch.no_grad():
            try:
                flat = self.features(torch.zeros(1, 3, image_size, image_size)).shape[1]
            except RuntimeError:
                raise ValueError(f"image_size={image_size} is too small for KochNet; "
                                 "use 80 or more (the paper's is 105)") from None
        self.drop = nn.Dropout(p)  # apart from fc, so that older checkpoints' keys still load
        self.fc = nn.Sequential(nn.Linear(flat, 64 * w), nn.Sigmoid())
        self.out_dim = 64 * w

    def forward(self, x):
        return self.fc(self.drop(self.features(x)))


def basic_block(cin, cout, stride):
    """Residual block in ArcFace's IResNet order (BN-conv-BN-PReLU-conv-BN), but striding in
    the first conv as ResNet does: the second conv then runs at the lower resolution, which
    halves the block's cost on a CPU."""
    body = nn.Sequential(
        nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
        nn.PReLU(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
    short = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    return Residual(body, short)


class Residual(nn.Module):
    def __init__(self, body, short):
        super().__init__()
        self.body, self.short = body, short

    def forward(self, x):
        return self.body(x) + self.short(x)


class CompactResNet(nn.Module):
    """A small IResNet-style face CNN sized for a CPU budget (~2M parameters at 112 px).

    Stem at stride 2, four residual stages, then a global depthwise conv (MobileFaceNet's
    GDC) instead of average pooling, which keeps where on the face a feature was seen.
    """

    def __init__(self, image_size=112, embedding_dim=256, widths=(32, 64, 128, 256),
                 blocks=(1, 2, 3, 1), p=0.0, first_stride=2):
        super().__init__()
        layers = [nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                  nn.PReLU(widths[0])]
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = (first_stride if i == 0 else 2) if j == 0 else 1
                layers.append(basic_block(cin, w, stride))
                cin = w
        layers.append(nn.BatchNorm2d(cin))
        self.features = nn.Sequential(*layers)
        with torch.no_grad():  # in eval mode: a dummy batch must not touch BN statistics
            side = self.features.eval()(torch.zeros(1, 3, image_size, image_size)).shape[-1]
        self.features.train()
        self.head = nn.Sequential(
            nn.Conv2d(cin, cin, side, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.Flatten(),
            nn.Dropout(p), nn.Linear(cin, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim))
        self.out_dim = embedding_dim

    def forward(self, x):
        return self.head(self.features(x))


def mlp_head(in_dim, hidden, depth, activation, p):
    """depth x (Linear, activation, Dropout). depth=0 keeps the backbone's features."""
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[activation]
    layers, dim = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(dim, hidden), act(), nn.Dropout(p)]
        dim = hidden
    return nn.Sequential(*layers), dim


class ResNeXtEmbedder(nn.Module):
    """torchvision's ResNeXt-50 32x4d without its classifier, optionally without layer4,
    then average pooling and an MLP head."""

    def __init__(self, pretrained, drop_layer4, head_hidden, head_depth, activation, p):
        super().__init__()
        net = torchvision.models.resnext50_32x4d(weights=None)
        if pretrained:
            net.load_state_dict(imagenet_weights())
        if drop_layer4:
            net.layer4 = nn.Identity()
        net.fc = nn.Identity()
        self.body = net
        self.head, self.out_dim = mlp_head(1024 if drop_layer4 else 2048, head_hidden,
                                           head_depth, activation, p)

    def forward(self, x):
        return self.head(self.body(x))


IMAGENET = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V2


def imagenet_weights_file():
    """Where torchvision's cache keeps the ResNeXt-50 ImageNet weights (TORCH_HOME/hub)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(IMAGENET.url).name


def imagenet_weights():
    """ResNeXt-50 ImageNet weights through torchvision's cache, downloaded when absent."""
    weights = IMAGENET
    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError) as e:
        name, where = Path(weights.url).name, imagenet_weights_file()
        raise PretrainedWeightsMissing(
            f"cannot download ImageNet weights {name} ({e.__class__.__name__}): fetch "
            f"{weights.url} on a machine with internet and put it at {where}, or train from "
            "scratch with --pretrained=False") from None


def init_weights(module, scheme):
    """Initialise freshly created layers. Called only on layers that hold no pretrained
    weights. 'koch' is the paper's: N(0, 1e-2) weights, N(0.5, 1e-2) biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "koch":
                nn.init.normal_(m.weight, 0.0, 1e-2)
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0.5, 1e-2)
            elif scheme == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------ siamese net

class SiameseNet(nn.Module):
    """embed(x) -> embeddings; score(e1, e2) -> pair scores; forward(x1, x2) -> scores.

    With loss='bce' the score is the paper's: a linear layer on |e1 - e2| (L1) or on the
    cosine similarity, giving a logit. With embedding losses it is the cosine similarity or
    minus the L1 distance. Higher always means more likely the same person.
    """

    def __init__(self, backbone, loss="bce", distance="l1"):
        super().__init__()
        self.backbone, self.loss, self.distance = backbone, loss, distance
        self.head = nn.Linear(backbone.out_dim if distance == "l1" else 1, 1) \
            if loss == "bce" else None

    def embed(self, x):
        return self.backbone(x)

    def score(self, e1, e2):
        if self.loss == "bce":
            d = (e1 - e2).abs() if self.distance == "l1" else \
                F.cosine_similarity(e1, e2).unsqueeze(1)
            return self.head(d).squeeze(1)
        return -pair_distance(e1, e2, self.distance)

    def forward(self, x1, x2=None):
        """Pair scores, or embeddings when given one batch (so DDP sees every call)."""
        if x2 is None:
            return self.embed(x1)
        e = self.embed(torch.cat([x1, x2]))  # one pass over both halves
        return self.score(*e.chunk(2))


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


@torch.no_grad()
def score_faces(net, image_size, face_a, face_b, flip=False, amp=False):
    """Score of two aligned uint8 face crops with a trained net (higher = same person).
    amp: embed in the mixed precision the net was validated in, so the score matches its
    threshold."""
    import dataset  # the input pipeline lives there; imported here to keep model.py light
    from runtime import autocast
    faces = torch.stack([dataset.fit(face_a, image_size), dataset.fit(face_b, image_size)])
    device = next(net.parameters()).device
    with autocast(amp, device):
        e = embed_images(net, faces, dataset.eval_transform(), device=device, flip=flip)
    return float(net.score(e[:1].to(device), e[1:].to(device)))


SCORE_CHUNK = 8192  # pairs scored per call: bounds memory with 4096-d Koch embeddings


def unique_images(pairs):
    """(sorted unique paths, index_a, index_b) of [(path_a, path_b, ...)] pairs."""
    paths = sorted({p for pair in pairs for p in pair[:2]})
    index = {p: i for i, p in enumerate(paths)}
    return (paths, torch.tensor([index[pair[0]] for pair in pairs], dtype=torch.long),
            torch.tensor([index[pair[1]] for pair in pairs], dtype=torch.long))


@torch.no_grad()
def score_pairs(net, pairs, images_of, batch_size=256, device="cpu", flip=False, amp=False):
    """The one way pairs are scored (validation, evaluate.py, the benchmark): embed every
    unique image once, then score every pair from the cached embeddings in vectorised chunks.

    pairs: [(path_a, path_b, ...)]; images_of(paths) -> uint8 (N, 3, H, W) at the net's input
    size. amp: embed in the mixed precision the net was trained and validated in, so that
    scores match its threshold. Returns a dict: scores (numpy), embeddings, a and b (index
    tensors into them), paths, images and the seconds spent decoding, embedding and scoring.
    """
    import dataset  # the input pipeline lives there; imported here to keep model.py light
    from runtime import autocast
    device = torch.device(device)
    paths, a, b = unique_images(pairs)
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


def pair_distance(e1, e2, distance):
    """L1 distance, or cosine distance (1 - cosine similarity)."""
    if distance == "l1":
        return (e1 - e2).abs().sum(1)
    return 1 - F.cosine_similarity(e1, e2)


def build_model(cfg, pretrained=False):
    """A SiameseNet from a ModelConfig (or a dict with its keys). pretrained: start a ResNeXt
    body from ImageNet weights (training only; a checkpoint brings its own weights)."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig.from_dict(cfg)
    if cfg.model == "koch":
        backbone = KochNet(cfg.image_size, cfg.width or 64, cfg.p)
        init_weights(backbone, cfg.init)
    elif cfg.model == "compact":
        backbone = CompactResNet(cfg.image_size, cfg.embedding_dim, p=cfg.p,
                                 widths=tuple((cfg.width or 32) * 2 ** i for i in range(4)))
        init_weights(backbone, cfg.init)
    else:
        backbone = ResNeXtEmbedder(pretrained, cfg.drop_layer4, cfg.head_hidden, cfg.head_depth,
                                   cfg.activation, cfg.p)
        # The head is new either way; the body only when there are no ImageNet weights.
        init_weights(backbone.head, cfg.init)
        if not pretrained:
            init_weights(backbone.body, cfg.init)
    net = SiameseNet(backbone, cfg.loss, cfg.distance)
    if net.head is not None:
        init_weights(net.head, "default")
    return net


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
    photo's face is made the same way. Checkpoints from before settings were recorded were
    trained on the crop script's defaults of the time (aligned, 112 px); a net trained on
    whole photos or on a folder without crop_settings.json cannot be fed a face."""
    import faces  # detection lives there; imported here to keep model.py light
    if ckpt.get("crop"):
        return faces.crop_settings(**ckpt["crop"])
    cfg = ckpt.get("config", {})
    if "crop" not in ckpt and cfg.get("aligned_faces", False):  # older trainer2.py checkpoint
        return faces.crop_settings()
    raise CheckpointError(f"{path}: trained on {cfg.get('data_dir', 'a folder')}, which holds "
                          f"no {faces.SETTINGS_FILE} (whole photos, as trainer.py uses, or crops "
                          "made before the crop script recorded its settings), so its faces "
                          "cannot be rebuilt here; train on crops from "
                          "`python crop_dataset_to_faces.py` (trainer2.py does)")


# ------------------------------------------------------------------------------ losses

def bce_loss(logits, labels):
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def contrastive_loss(e1, e2, labels, distance="l1", margin=1.0):
    """Hadsell et al. 2006: pull same pairs together, push different pairs past the margin."""
    d = pair_distance(e1, e2, distance)
    labels = labels.float()
    return (labels * d.pow(2) + (1 - labels) * F.relu(margin - d).pow(2)).mean()


def pairwise_distances(e, distance):
    if distance == "l1":
        return torch.cdist(e, e, p=1)
    e = F.normalize(e, dim=1)
    return 1 - e @ e.t()


def batch_hard_triplet_loss(e, ids, distance="cosine", margin=0.2):
    """Hermans et al. 2017: for each anchor, its farthest positive and nearest negative in
    the batch. Anchors without a positive in the batch are left out."""
    d = pairwise_distances(e, distance)
    same = ids[:, None] == ids[None, :]
    eye = torch.eye(len(ids), dtype=torch.bool, device=e.device)
    pos = (d * (same & ~eye)).max(1).values
    neg = d.masked_fill(same, float("inf")).min(1).values
    valid = (same & ~eye).any(1) & torch.isfinite(neg)
    if not valid.any():
        return e.sum() * 0.0
    return F.relu(pos - neg + margin)[valid].mean()


class ArcFace(nn.Module):
    """Additive angular margin (Deng et al. 2019) over the training identities: logits
    s * (cos(theta + m) - m_cos) for the true class, s * cos(theta) for the others. m_cos is
    CosFace's additive cosine margin (Wang et al. 2018): m=0 with m_cos>0 is CosFace."""

    def __init__(self, embedding_dim, n_classes, scale=32.0, margin=0.5, cos_margin=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin, self.cos_margin = scale, margin, cos_margin

    def forward(self, e, ids, label_smoothing=0.0):
        cos = F.linear(F.normalize(e.float()), F.normalize(self.weight.float())).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(cos.gather(1, ids[:, None]))
        target = torch.cos(theta + self.margin)
        # Past pi - m the margin would bend cos back up; fall back to CosFace's shift there.
        target = torch.where(theta + self.margin < torch.pi, target,
                             cos.gather(1, ids[:, None]) - self.margin * torch.sin(torch.tensor(self.margin)))
        logits = cos.scatter(1, ids[:, None], target - self.cos_margin) * self.scale
        return F.cross_entropy(logits, ids, label_smoothing=label_smoothing)


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


def export_weights(ckpt, path):
    """A checkpoint as a small file to ship: weights only, in half precision, plus what
    rebuilding the network and its faces needs and what it was validated at."""
    from runtime import write_atomic
    small = {"model": {k: v.half() if v.is_floating_point() else v
                       for k, v in ckpt["model"].items()},
             "model_config": ckpt["model_config"], "crop": ckpt.get("crop"),
             "threshold": ckpt["threshold"], "metrics": ckpt["metrics"],
             "epoch": ckpt.get("epoch"), "train_people": ckpt.get("train_people", []),
             "config": {k: ckpt["config"][k] for k in ("mixed_precision", "data_dir", "split")
                        if k in ckpt.get("config", {})},
             "git_commit": ckpt.get("git_commit"), "shipped": True}
    write_atomic(path, write=lambda tmp: torch.save(small, tmp))
