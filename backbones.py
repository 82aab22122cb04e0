"""The backbone registry: every network that maps a face to an embedding, by name.

The contract a backbone keeps, which is all the rest of the code relies on:
- build(cfg, pretrained) returns an nn.Module. cfg is the run's ModelConfig; the builder reads
  cfg.image_size, cfg.init and its own settings as cfg.get(name). pretrained=True asks for the
  backbone's outside weights (training only: a checkpoint brings its own weights).
- The module takes float images (N, 3, S, S) at S = cfg.image_size, normalised as
  dataset.eval_transform() does, and returns embeddings (N, module.out_dim).
- module.pretrained_parameters() lists the parameters that came from outside weights (empty
  when trained from scratch), so a trainer can give them their own learning rate or freeze
  them. Every other layer is new and initialised with cfg.init.
- settings: the backbone's own hyperparameters and their defaults (each default lives only
  here); trainers take them as --name=value, and checkpoints store them in model_config.

Adding a backbone is one register() call here plus its test.
"""
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision


@dataclass(frozen=True)
class Backbone:
    build: object                 # build(cfg, pretrained) -> nn.Module with out_dim
    settings: dict = field(default_factory=dict)   # name -> (default, meaning)
    about: str = ""
    choices: dict = field(default_factory=dict)    # name -> allowed values
    limits: dict = field(default_factory=dict)     # name -> (lowest, highest or None)

    def check(self, values):
        """ValueError naming the first setting out of its choices or limits."""
        for name, allowed in self.choices.items():
            if values[name] not in allowed:
                raise ValueError(f"{name}={values[name]!r} is not one of {', '.join(allowed)}")
        for name, (low, high) in self.limits.items():
            if values[name] < low or (high is not None and values[name] >= high):
                within = f"at least {low}" + (f" and below {high}" if high is not None else "")
                raise ValueError(f"{name}={values[name]!r} must be {within}")


BACKBONES = {}


def register(name, about, settings=None, choices=None, limits=None):
    """Decorator: add build(cfg, pretrained) to the registry under name."""
    def add(build):
        for key, (default, _) in (settings or {}).items():
            for other, entry in BACKBONES.items():  # one name, one meaning, one default
                if key in entry.settings and entry.settings[key][0] != default:
                    raise ValueError(f"backbone {name}: setting {key} defaults to {default!r} "
                                     f"but {other}'s to {entry.settings[key][0]!r}; rename it")
        BACKBONES[name] = Backbone(build, dict(settings or {}), about, dict(choices or {}),
                                   dict(limits or {}))
        return build
    return add


class PretrainedWeightsMissing(RuntimeError):
    pass


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
        self.drop = nn.Dropout(p)
        self.fc = nn.Sequential(nn.Linear(flat, 64 * w), nn.Sigmoid())
        self.out_dim = 64 * w

    def forward(self, x):
        return self.fc(self.drop(self.features(x)))

    def pretrained_parameters(self):
        return []


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

    def pretrained_parameters(self):
        return []


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
        self.body, self.pretrained = net, pretrained
        self.head, self.out_dim = mlp_head(1024 if drop_layer4 else 2048, head_hidden,
                                           head_depth, activation, p)

    def forward(self, x):
        return self.head(self.body(x))

    def pretrained_parameters(self):
        return list(self.body.parameters()) if self.pretrained else []


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




# ------------------------------------------------------------------------------ the registry

@register("koch", "Koch et al. 2015: four conv layers and a 4096-unit sigmoid layer",
          settings={"width": (0, "first-stage channels, the others in proportion (0: the "
                                 "paper's 64)"),
                    "p": (0.0, "dropout before the last layer")},
          limits={"width": (0, None), "p": (0, 1)})
def build_koch(cfg, pretrained):
    net = KochNet(cfg.image_size, cfg.get("width") or 64, cfg.get("p"))
    init_weights(net, cfg.init)
    return net


@register("compact", "a 2M-parameter IResNet-style CNN with a global depthwise conv",
          settings={"embedding_dim": (256, "embedding size"),
                    "width": (0, "first-stage channels, the others in proportion (0: 32)"),
                    "p": (0.0, "dropout before the embedding layer")},
          limits={"embedding_dim": (1, None), "width": (0, None), "p": (0, 1)})
def build_compact(cfg, pretrained):
    w = cfg.get("width") or 32
    net = CompactResNet(cfg.image_size, cfg.get("embedding_dim"), p=cfg.get("p"),
                        widths=tuple(w * 2 ** i for i in range(4)))
    init_weights(net, cfg.init)
    return net


@register("resnext", "torchvision's ResNeXt-50 32x4d (ImageNet weights through torchvision's "
          "cache) with an MLP head",
          settings={"drop_layer4": (False, "cut the last stage"),
                    "head_hidden": (1024, "hidden size of the MLP head"),
                    "head_depth": (1, "layers in the MLP head"),
                    "activation": ("sigmoid", "activation of the MLP head: sigmoid or relu"),
                    "p": (0.0, "dropout in the MLP head")},
          choices={"activation": ("sigmoid", "relu")},
          limits={"head_hidden": (1, None), "head_depth": (0, None), "p": (0, 1)})
def build_resnext(cfg, pretrained):
    net = ResNeXtEmbedder(pretrained, cfg.get("drop_layer4"), cfg.get("head_hidden"),
                          cfg.get("head_depth"), cfg.get("activation"), cfg.get("p"))
    # The head is new either way; the body only when there are no ImageNet weights.
    init_weights(net.head, cfg.init)
    if not pretrained:
        init_weights(net.body, cfg.init)
    return net
