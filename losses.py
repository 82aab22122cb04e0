"""The loss registry: every training loss, by name, with what it owns and what it needs.

A loss is an nn.Module registered here. It declares:
- batches: the data it trains on, one of BATCHES: random same/different pairs ("pairs"),
  P people x K images ("people"), or every training image with its identity ("images");
- learned_head: whether pairs are scored by a layer trained with the loss (the network's
  head, made by pair_head) rather than by the embeddings' distance;
- settings: its own hyperparameters and their defaults (each default lives only here);
- forward(net, x1, x2, y): the training loss of a batch (x2 is None but for "pairs");
- validation_loss(scores, emb, a, b, y, ids): the same loss on the validation people, from
  the embeddings that validation computes anyway, so that best_loss.pt is chosen on the loss
  the run trains.
The loss owns its parameters (ArcFace's class centres), so that DDP and the optimizer see
them through the one training module. Adding a loss is one class here plus its test.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

# Each kind of batch with the settings of its sampler (name -> (default, meaning)).
BATCHES = {"pairs": ("random same/different pairs of training images",
                     {"pairs_per_epoch": (0, "pairs drawn per epoch (0: 2 x training images)")}),
           "people": ("P people x K images a batch",
                      {"per_person": (4, "images per person in a batch")}),
           "images": ("every training image with its identity", {})}
LOSSES = {}


def register(cls):
    """Class decorator: add a loss under cls.name, refusing a batch kind nobody makes."""
    if cls.batches not in BATCHES:
        raise ValueError(f"loss {cls.name}: batches={cls.batches!r} is not one of "
                         f"{', '.join(BATCHES)}")
    LOSSES[cls.name] = cls
    return cls


def all_settings():
    """Every loss's and batch sampler's own settings: name -> (default, meaning)."""
    out = {}
    for about, own in BATCHES.values():
        out.update(own)
    for cls in LOSSES.values():
        out.update(cls.settings)
    return out


def build_loss(cfg, out_dim, n_classes):
    """The loss module a run trains with; cfg holds its settings."""
    cls = LOSSES[cfg["loss"]]
    return cls(out_dim, n_classes, cfg["distance"], **{k: cfg[k] for k in cls.settings})


def pair_distance(e1, e2, distance):
    """L1 distance, or cosine distance (1 - cosine similarity)."""
    if distance == "l1":
        return (e1 - e2).abs().sum(1)
    return 1 - F.cosine_similarity(e1, e2)


def pairwise_distances(e, distance):
    if distance == "l1":
        return torch.cdist(e, e, p=1)
    e = F.normalize(e, dim=1)
    return 1 - e @ e.t()


def bce_loss(logits, labels):
    return F.binary_cross_entropy_with_logits(logits, labels.float())


def contrastive_loss(e1, e2, labels, distance="l1", margin=1.0):
    """Hadsell et al. 2006: pull same pairs together, push different pairs past the margin."""
    d = pair_distance(e1, e2, distance)
    labels = labels.float()
    return (labels * d.pow(2) + (1 - labels) * F.relu(margin - d).pow(2)).mean()


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


def arc_margin_logits(cos, ids, scale, margin, cos_margin):
    """ArcFace's logits from cosines to class centres: s * (cos(theta + m) - m_cos) for the
    true class, s * cos(theta) for the others."""
    cos = cos.clamp(-1 + 1e-7, 1 - 1e-7)
    true = cos.gather(1, ids[:, None])
    theta = torch.acos(true)
    # Past pi - m the margin would bend cos back up; fall back to CosFace's shift there.
    target = torch.where(theta + margin < torch.pi, torch.cos(theta + margin),
                         true - margin * torch.sin(torch.tensor(margin)))
    return cos.scatter(1, ids[:, None], target - cos_margin) * scale


class PairHead(nn.Linear):
    """The paper's pair score: a linear layer on |e1 - e2| (L1) or on the cosine similarity,
    giving a logit. A Linear itself, so that checkpoints keep the keys head.weight/bias."""

    def __init__(self, out_dim, distance):
        super().__init__(out_dim if distance == "l1" else 1, 1)
        self.distance = distance

    def features(self, e1, e2):
        return (e1 - e2).abs() if self.distance == "l1" else \
            F.cosine_similarity(e1, e2).unsqueeze(1)

    def logit(self, features):
        return F.linear(features, self.weight, self.bias).squeeze(-1)

    def score(self, e1, e2):
        return self.logit(self.features(e1, e2))


class Loss(nn.Module):
    name, batches, learned_head, settings = "", "", False, {}

    def __init__(self, out_dim, n_classes, distance):
        super().__init__()
        self.distance = distance

    @staticmethod
    def pair_head(out_dim, distance):
        """The layer that scores pairs when learned_head; None: -distance scores them."""
        return None

    def check_data(self, cfg, data):
        """Raise ValueError (one line: the file and the fix) if this loss cannot train on the
        run's data; most losses can."""


@register
class BCE(Loss):
    """Binary cross-entropy on random pairs, scored by a learnt head (Koch et al. 2015)."""
    name, batches, learned_head = "bce", "pairs", True

    @staticmethod
    def pair_head(out_dim, distance):
        return PairHead(out_dim, distance)

    def forward(self, net, x1, x2, y):
        return bce_loss(net(x1, x2), y)

    def validation_loss(self, scores, emb, a, b, y, ids):
        return bce_loss(scores, y)


@register
class Contrastive(Loss):
    """Hadsell et al. 2006 on random pairs."""
    name, batches = "contrastive", "pairs"
    settings = {"contrastive_margin": (0.5, "distance past which different pairs cost nothing")}

    def __init__(self, out_dim, n_classes, distance, contrastive_margin):
        super().__init__(out_dim, n_classes, distance)
        self.margin = contrastive_margin

    def forward(self, net, x1, x2, y):
        e1, e2 = net(torch.cat([x1, x2])).chunk(2)
        return contrastive_loss(e1, e2, y, self.distance, self.margin)

    def validation_loss(self, scores, emb, a, b, y, ids):
        return contrastive_loss(emb[a], emb[b], y, self.distance, self.margin)


@register
class Triplet(Loss):
    """Batch-hard triplets over P x K batches (Hermans et al. 2017)."""
    name, batches = "triplet", "people"
    settings = {"triplet_margin": (0.5, "how much nearer the farthest positive must be than "
                                        "the nearest negative")}

    def __init__(self, out_dim, n_classes, distance, triplet_margin):
        super().__init__(out_dim, n_classes, distance)
        self.margin = triplet_margin

    def forward(self, net, x1, x2, y):
        return batch_hard_triplet_loss(net(x1), y, self.distance, self.margin)

    def validation_loss(self, scores, emb, a, b, y, ids):
        # every validation image in one batch: the hardest positive and negative among all
        return batch_hard_triplet_loss(emb, ids, self.distance, self.margin)


@register
class ArcFace(Loss):
    """Additive angular margin (Deng et al. 2019) over the training identities, whose class
    centres it owns. cos_margin is CosFace's additive cosine margin (Wang et al. 2018):
    arc_margin=0 with cos_margin>0 is CosFace."""
    name, batches = "arcface", "images"
    settings = {"arc_margin": (0.5, "additive angle margin, in radians"),
                "arc_scale": (32.0, "logit scale"),
                "cos_margin": (0.0, "CosFace's additive cosine margin (arc_margin=0, "
                                    "cos_margin=0.35: CosFace)"),
                "label_smoothing": (0.0, "label smoothing of the softmax")}

    def __init__(self, out_dim, n_classes, distance, arc_margin, arc_scale, cos_margin,
                 label_smoothing):
        super().__init__(out_dim, n_classes, distance)
        self.weight = nn.Parameter(torch.empty(n_classes, out_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin, self.cos_margin = arc_scale, arc_margin, cos_margin
        self.label_smoothing = label_smoothing

    def centre_loss(self, e, ids, centres):
        cos = F.linear(F.normalize(e.float()), F.normalize(centres.float()))
        logits = arc_margin_logits(cos, ids, self.scale, self.margin, self.cos_margin)
        return F.cross_entropy(logits, ids, label_smoothing=self.label_smoothing)

    def embedding_loss(self, e, ids):
        return self.centre_loss(e, ids, self.weight)

    def forward(self, net, x1, x2, y):
        return self.embedding_loss(net(x1), y)

    def validation_loss(self, scores, emb, a, b, y, ids):
        # Validation people have no trained centres: each person's mean embedding stands in.
        centres = torch.zeros(int(ids.max()) + 1, emb.shape[1]).index_add_(
            0, ids, F.normalize(emb.float()))
        return self.centre_loss(emb, ids, centres)


def similarity_matching_loss(e, t):
    """Relational distillation (Park et al. 2019): the mean squared difference between the
    student's and the teacher's cosine of every two images of the batch."""
    s, t = F.normalize(e.float(), dim=1), F.normalize(t.float(), dim=1)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return (s @ s.t() - t @ t.t())[off].pow(2).mean()


@register
class Distill(ArcFace):
    """ArcFace, plus matching a trained teacher's cosine between every two images of the
    batch (similarity_matching_loss): one network learns what an ensemble knows, in any
    embedding size. The teacher sees the same augmented batch, frozen; it stays out of the
    optimizer and the checkpoints, which hold a plain network. It must have been validated on
    the run's own validation people (check_data), or the run's validation would score people
    the teacher trained on."""
    name = "distill"
    settings = {**ArcFace.settings,
                "teacher": ("", "the checkpoint to learn from (an ensemble's best_accuracy.pt)"),
                # The term starts near 0.02 (the cosines of a batch spread by about 0.15), and
                # a trained member sits 0.004 from its ensemble of three: at 100 it is about 2
                # against ArcFace's 20 at the start and 0.4 against its 3 at a run's end.
                "distill_weight": (100.0, "weight of the similarity-matching term")}

    def __init__(self, out_dim, n_classes, distance, teacher, distill_weight, **arcface):
        super().__init__(out_dim, n_classes, distance, **arcface)
        if not teacher:
            raise ValueError("loss=distill needs --teacher=PATH, the checkpoint to learn from "
                             "(an ensemble.py output, say)")
        from model import load_checkpoint  # model.py imports this file
        net, ckpt = load_checkpoint(teacher)
        for p in net.parameters():
            p.requires_grad_(False)
        # In a tuple, not an attribute: a submodule would enter state_dict and the optimizer.
        self.teacher, self.teacher_path = (net,), teacher
        self.teacher_size, self.teacher_val = ckpt["model_config"]["image_size"], \
            sorted(ckpt.get("val_people") or [])
        self.weight_kd = distill_weight

    def check_data(self, cfg, data):
        if cfg["image_size"] != self.teacher_size:
            raise ValueError(f"{self.teacher_path}: the teacher takes {self.teacher_size} px "
                             f"faces, this run {cfg['image_size']} px; train at its size")
        if self.teacher_val != sorted(data.split["val_people"]):
            raise ValueError(f"{self.teacher_path}: the teacher was validated on other people "
                             "than this run's; train with the --seed (and --split, --fold) "
                             "its members trained with")

    def forward(self, net, x1, x2, y):
        teacher = self.teacher[0]
        if next(teacher.parameters()).device != x1.device:
            teacher.to(x1.device)
        e = net(x1)
        with torch.no_grad(), torch.autocast(x1.device.type, enabled=False):
            t = teacher.backbone(x1.float())
        return self.embedding_loss(e, y) + self.weight_kd * similarity_matching_loss(e, t)
