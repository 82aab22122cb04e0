"""Siamese networks for face verification: backbones, pair scoring and losses.

A backbone maps an image to an embedding. SiameseNet.embed runs it once per image and
SiameseNet.score turns two embeddings into a pair score (higher = same person), so that
evaluation embeds each image once and scores pairs from cached embeddings.
"""
import urllib.error
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# What a checkpoint needs to rebuild its network; every trainer hyperparameter not listed
# here only affects training.
MODEL_KEYS = ("model", "image_size", "embedding_dim", "loss", "distance", "drop_layer4",
              "head_hidden", "head_depth", "activation", "p", "init")


class PretrainedWeightsMissing(RuntimeError):
    pass


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit this model.py; one clear line."""


# ------------------------------------------------------------------------------ backbones

class KochNet(nn.Module):
    """Koch et al. 2015: four conv layers, then a 4096-unit sigmoid layer. The flatten size
    is computed from the input size, so any image_size works."""

    def __init__(self, image_size=105):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 10), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 7), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 4), nn.ReLU(inplace=True), nn.Flatten())
        with torch.no_grad():
            try:
                flat = self.features(torch.zeros(1, 3, image_size, image_size)).shape[1]
            except RuntimeError:
                raise ValueError(f"image_size={image_size} is too small for KochNet; "
                                 "use 80 or more (the paper's is 105)") from None
        self.fc = nn.Sequential(nn.Linear(flat, 4096), nn.Sigmoid())
        self.out_dim = 4096

    def forward(self, x):
        return self.fc(self.features(x))


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

    def __init__(self, pretrained=True, drop_layer4=False, head_hidden=1024, head_depth=1,
                 activation="sigmoid", p=0.8):
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


def imagenet_weights():
    """ResNeXt-50 ImageNet weights through torchvision's cache (TORCH_HOME/hub/checkpoints)."""
    weights = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V2
    try:
        return weights.get_state_dict(progress=True)
    except (urllib.error.URLError, OSError) as e:
        name = Path(weights.url).name
        where = Path(torch.hub.get_dir()) / "checkpoints" / name
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
            elif scheme != "default":
                raise ValueError(f"unknown init {scheme!r}: use default, kaiming, xavier or koch")


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


def pair_distance(e1, e2, distance):
    """L1 distance, or cosine distance (1 - cosine similarity)."""
    if distance == "l1":
        return (e1 - e2).abs().sum(1)
    return 1 - F.cosine_similarity(e1, e2)


def build_model(cfg, pretrained=None):
    """A SiameseNet from a config dict (the trainer hyperparameters or a checkpoint's)."""
    name = cfg["model"]
    pretrained = cfg.get("pretrained", False) if pretrained is None else pretrained
    if name == "koch":
        backbone = KochNet(cfg["image_size"])
        init_weights(backbone, cfg.get("init", "koch"))
    elif name == "compact":
        backbone = CompactResNet(cfg["image_size"], cfg.get("embedding_dim", 256), p=cfg.get("p", 0.0))
        init_weights(backbone, cfg.get("init", "kaiming"))
    elif name == "resnext":
        backbone = ResNeXtEmbedder(pretrained, cfg.get("drop_layer4", False),
                                   cfg.get("head_hidden", 1024), cfg.get("head_depth", 1),
                                   cfg.get("activation", "sigmoid"), cfg.get("p", 0.8))
        # The head is new either way; the body only when there are no ImageNet weights.
        init_weights(backbone.head, cfg.get("init", "default"))
        if not pretrained:
            init_weights(backbone.body, cfg.get("init", "default"))
    else:
        raise ValueError(f"unknown model {name!r}: use koch, compact or resnext")
    net = SiameseNet(backbone, cfg.get("loss", "bce"), cfg.get("distance", "l1"))
    if net.head is not None:
        init_weights(net.head, "default")
    return net


def load_checkpoint(path, device="cpu"):
    """Rebuild a network from a checkpoint alone. Returns (net in eval mode, checkpoint), or
    raises CheckpointError with one line that names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train one with `python trainer2.py`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        net = build_model(ckpt["model_config"], pretrained=False)
    except Exception as e:  # torch.load fails in many ways on a truncated or foreign file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{detail}); pass a best_*.pt written by trainer2.py") from None
    try:
        net.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError):
        raise CheckpointError(f"{path}: its weights do not fit the network model.py builds for "
                              "its model_config; use the version of model.py it was trained "
                              f"with (commit {ckpt.get('git_commit', 'unknown')})") from None
    return net.to(device).eval(), ckpt


def require_aligned_faces(ckpt, path):
    """verify.py and the demo feed aligned face crops; a net trained on whole photos
    (trainer.py) would give meaningless scores there."""
    if not ckpt.get("config", {}).get("aligned_faces", True):
        raise CheckpointError(f"{path}: trained on whole photos (aligned_faces=False, as "
                              "trainer.py does), but faces are aligned here; use a trainer2.py "
                              "checkpoint")


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
    s * cos(theta + m) for the true class, s * cos(theta) for the others."""

    def __init__(self, embedding_dim, n_classes, scale=32.0, margin=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin

    def forward(self, e, ids, label_smoothing=0.0):
        cos = F.linear(F.normalize(e.float()), F.normalize(self.weight.float())).clamp(-1 + 1e-7, 1 - 1e-7)
        theta = torch.acos(cos.gather(1, ids[:, None]))
        target = torch.cos(theta + self.margin)
        # Past pi - m the margin would bend cos back up; fall back to CosFace's shift there.
        target = torch.where(theta + self.margin < torch.pi, target,
                             cos.gather(1, ids[:, None]) - self.margin * torch.sin(torch.tensor(self.margin)))
        logits = cos.scatter(1, ids[:, None], target) * self.scale
        return F.cross_entropy(logits, ids, label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------ finding checkpoints

def list_checkpoints(logs="logs"):
    """Every logs/<run>/best_*.pt, newest first, with what a chooser shows: path, run, the
    metric it is best at, model, loss, distance, image size, epoch, validation accuracy,
    threshold and mtime. Files that do not load as checkpoints are left out."""
    rows = []
    for path in Path(logs).glob("*/best_*.pt"):
        try:
            # mmap: read the metadata without pulling every weight into memory
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            cfg = ckpt["model_config"]
            rows.append({"path": path, "run": path.parent.name, "best": path.stem[len("best_"):],
                         "model": cfg["model"], "loss": cfg.get("loss"),
                         "distance": cfg.get("distance"), "image_size": cfg["image_size"],
                         "epoch": ckpt.get("epoch"), "accuracy": ckpt["metrics"].get("accuracy"),
                         "threshold": ckpt["threshold"], "mtime": path.stat().st_mtime})
        except Exception:  # torch.load fails in many ways on a half-written or foreign file
            continue
    return sorted(rows, key=lambda r: r["mtime"], reverse=True)


def newest_checkpoint(logs="logs", name="best_accuracy.pt"):
    """The most recently written logs/<run>/best_accuracy.pt, or None if there is none."""
    paths = list(Path(logs).glob(f"*/{name}"))
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None
