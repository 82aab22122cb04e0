import math
import urllib.error

import pytest
import torch
import torchvision

import backbones
import losses
import model as m

BASE = {"model": "compact", "image_size": 64, "embedding_dim": 32, "loss": "bce",
        "distance": "l1", "drop_layer4": False, "head_hidden": 64, "head_depth": 1,
        "activation": "sigmoid", "p": 0.0, "init": "default"}


@pytest.mark.parametrize("size", [105, 84])
def test_kochnet_works_at_two_input_sizes(size):
    net = backbones.KochNet(size)
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 4096) and ((out > 0) & (out < 1)).all()  # sigmoid layer
    assert net.fc[0].in_features == net.features(torch.zeros(1, 3, size, size)).shape[1]


@pytest.mark.parametrize("name", ["koch", "compact"])
@pytest.mark.parametrize("loss,distance", [("bce", "l1"), ("bce", "cosine"),
                                           ("contrastive", "l1"), ("triplet", "cosine"),
                                           ("arcface", "cosine")])
def test_every_model_and_loss_gives_shapes_and_gradients(name, loss, distance):
    size = 84 if name == "koch" else 64
    cfg = {**BASE, "model": name, "loss": loss, "distance": distance, "image_size": size}
    net = m.build_model(cfg)
    x1, x2 = torch.randn(4, 3, size, size), torch.randn(4, 3, size, size)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ids = torch.tensor([0, 0, 1, 1])
    if loss == "bce":
        out = losses.bce_loss(net(x1, x2), y)
    elif loss == "contrastive":
        e1, e2 = net(torch.cat([x1, x2])).chunk(2)
        out = losses.contrastive_loss(e1, e2, y, distance)
    elif loss == "triplet":
        out = losses.batch_hard_triplet_loss(net(x1), ids, distance, margin=0.2)
    else:
        out = arcface(net.backbone.out_dim, 2).embedding_loss(net(x1), ids)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    grads = [p.grad for p in net.backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert net(x1, x2).shape == (4,)


def test_kochnet_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="image_size=40 is too small for KochNet"):
        backbones.KochNet(40)


def test_pair_scores_from_cached_embeddings_equal_forward():
    net = m.build_model({**BASE, "loss": "bce"}).eval()
    x1, x2 = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        direct = net(x1, x2)
        cached = net.score(net.embed(x1), net.embed(x2))
    assert torch.allclose(direct, cached, atol=1e-5)


def test_embedding_losses_score_by_distance():
    net = m.build_model({**BASE, "loss": "triplet", "distance": "cosine"})
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert net.score(e1, e1).item() == pytest.approx(0.0) and net.score(e1, e2).item() == pytest.approx(-1.0)
    net.distance = "l1"
    assert net.score(e1, e2).item() == pytest.approx(-2.0)


def test_contrastive_loss_by_hand():
    e1, e2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.3, 0.0], [0.4, 0.0]])
    # same pair at L1 distance 0.3 -> 0.09; different pair at 0.4 with margin 1 -> 0.36
    got = losses.contrastive_loss(e1, e2, torch.tensor([1, 0]), "l1", margin=1.0)
    assert got.item() == pytest.approx((0.09 + 0.36) / 2)


def test_batch_hard_triplet_picks_hardest_positive_and_negative():
    e = torch.tensor([[0.0], [1.0], [3.0], [1.5]])
    ids = torch.tensor([0, 0, 1, 1])
    # anchor 0: hardest pos 1.0, nearest neg 1.5 -> relu(1 - 1.5 + 1) = 0.5
    # anchor 1: pos 1.0, neg 0.5 -> 1.5; anchor 2: pos 1.5, neg 2.0 -> 0.5; anchor 3: pos 1.5, neg 0.5 -> 2.0
    got = losses.batch_hard_triplet_loss(e, ids, "l1", margin=1.0)
    assert got.item() == pytest.approx((0.5 + 1.5 + 0.5 + 2.0) / 4)


def arcface(out_dim, n_classes, scale=32.0, margin=0.5, cos_margin=0.0, label_smoothing=0.0):
    return losses.ArcFace(out_dim, n_classes, "cosine", margin, scale, cos_margin, label_smoothing)


def test_arcface_margin_makes_the_true_class_harder():
    head = arcface(4, 3, scale=10.0, margin=0.5)
    e, ids = torch.randn(8, 4), torch.randint(0, 3, (8,))
    no_margin = arcface(4, 3, scale=10.0, margin=0.0)
    no_margin.weight.data.copy_(head.weight.data)
    assert head.embedding_loss(e, ids) > no_margin.embedding_loss(e, ids)


def arcface_on_angles(thetas, margin, scale, label_smoothing=0.0):
    """An ArcFace head over two classes with centres (1, 0) and (0, 1), and one embedding per
    angle theta from class 0's centre (class 1's cosine is then sin(theta)); all of class 0."""
    head = arcface(2, 2, scale=scale, margin=margin, label_smoothing=label_smoothing)
    head.weight.data.copy_(torch.eye(2))
    thetas = torch.tensor(thetas, dtype=torch.float64)
    e = torch.stack([thetas.cos(), thetas.sin()], 1).float()
    return head, e, torch.zeros(len(thetas), dtype=torch.long)


def arcface_loss_by_hand(true_logit, other_cos, scale):
    """Cross-entropy of class 0 with logits (s * true_logit, s * other_cos)."""
    return math.log1p(math.exp(scale * (other_cos - true_logit)))


@pytest.mark.parametrize("theta", [3.0, 2.9])
def test_arcface_past_pi_minus_margin_falls_back_to_a_cosface_shift(theta):
    """theta + m >= pi (here m = 0.5, theta = 3.0 or 2.9 rad): cos(theta + m) would bend back up
    (cos(3.5) > cos(3.0)), so the true-class logit is cos(theta) - m * sin(m) instead, which
    stays below cos(theta)."""
    margin, scale = 0.5, 4.0
    head, e, ids = arcface_on_angles([theta], margin, scale)
    target = math.cos(theta) - margin * math.sin(margin)
    assert theta + margin >= math.pi and target < math.cos(theta) < math.cos(theta + margin)
    want = arcface_loss_by_hand(target, math.sin(theta), scale)
    assert head.embedding_loss(e, ids).item() == pytest.approx(want, rel=1e-5)
    # Not the bent-back value the formula without the fallback gives.
    bent = arcface_loss_by_hand(math.cos(theta + margin), math.sin(theta), scale)
    assert head.embedding_loss(e, ids).item() != pytest.approx(bent, rel=1e-3)


def test_arcface_picks_the_branch_per_sample():
    """A batch with one sample on each side of pi - m: each gets its own branch, and the loss
    is the batch mean."""
    margin, scale = 0.5, 4.0
    head, e, ids = arcface_on_angles([1.0, 3.0], margin, scale)
    inside = arcface_loss_by_hand(math.cos(1.0 + margin), math.sin(1.0), scale)
    past = arcface_loss_by_hand(math.cos(3.0) - margin * math.sin(margin), math.sin(3.0), scale)
    assert head.embedding_loss(e, ids).item() == pytest.approx((inside + past) / 2, rel=1e-5)
    # Label smoothing eps mixes in the mean over classes of -log p: by hand for the pair.
    eps = 0.2
    def smoothed(t, o):
        lp_true = -arcface_loss_by_hand(t, o, scale)
        lp_other = -arcface_loss_by_hand(o, t, scale)
        return -(1 - eps) * lp_true - eps * (lp_true + lp_other) / 2
    want = (smoothed(math.cos(1.0 + margin), math.sin(1.0))
            + smoothed(math.cos(3.0) - margin * math.sin(margin), math.sin(3.0))) / 2
    smooth, e, ids = arcface_on_angles([1.0, 3.0], margin, scale, label_smoothing=eps)
    assert smooth.embedding_loss(e, ids).item() == pytest.approx(want, rel=1e-5)


def test_embed_images_with_flip_sums_both_views():
    net = m.build_model(BASE).eval()
    images = torch.randint(0, 255, (5, 3, 64, 64), dtype=torch.uint8)
    to_float = lambda x: x.float() / 255  # noqa: E731
    plain = m.embed_images(net, images, to_float, batch_size=2)
    flipped = m.embed_images(net, images.flip(3), to_float, batch_size=2)
    both = m.embed_images(net, images, to_float, batch_size=3, flip=True)
    assert plain.shape == (5, 32) and torch.allclose(both, plain + flipped, atol=1e-4)


# ---------------------------------------------------------------- pretrained ResNeXt weights

def resnext_cfg(**kw):
    return {**BASE, "model": "resnext", "image_size": 64, "head_hidden": 16, "p": 0.8,
            "init": "kaiming", **kw}


@pytest.fixture
def fake_imagenet_weights(tmp_path, monkeypatch):
    """A weights file written by the test into a temporary TORCH_HOME, where torchvision's
    cache looks first; nothing is downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(123)
    reference = torchvision.models.resnext50_32x4d(weights=None).state_dict()
    url = torchvision.models.ResNeXt50_32X4D_Weights.IMAGENET1K_V2.url
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    torch.save(reference, target)
    return reference


def test_pretrained_weights_load_and_init_does_not_overwrite_them(fake_imagenet_weights):
    net = m.build_model(resnext_cfg(), pretrained=True)
    body = net.backbone.body.state_dict()
    for k, v in fake_imagenet_weights.items():
        if not k.startswith("fc."):
            assert torch.equal(body[k], v), k


def test_without_pretrained_the_body_is_freshly_initialised(fake_imagenet_weights):
    net = m.build_model(resnext_cfg(), pretrained=False)
    w = net.backbone.body.conv1.weight
    assert not torch.equal(w, fake_imagenet_weights["conv1.weight"])


def test_resnext_options_drop_layer4_and_head():
    net = m.build_model(resnext_cfg(drop_layer4=True, head_depth=2, activation="relu"),
                        pretrained=False)
    assert isinstance(net.backbone.body.layer4, torch.nn.Identity)
    assert net.backbone.head[0].in_features == 1024 and net.backbone.out_dim == 16
    assert isinstance(net.backbone.head[1], torch.nn.ReLU)
    assert net.embed(torch.randn(2, 3, 64, 64)).shape == (2, 16)


def test_missing_pretrained_weights_give_one_clear_line(tmp_path, monkeypatch):
    import torchvision.models._api as api
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(backbones.PretrainedWeightsMissing) as e:
        m.build_model(resnext_cfg(), pretrained=True)
    text = str(e.value)
    assert "\n" not in text and "resnext50_32x4d-1a0047aa.pth" in text
    assert str(tmp_path / "hub" / "checkpoints") in text and "--pretrained=False" in text


def test_width_scales_koch_and_compact_and_old_configs_keep_their_own():
    build_model, ModelConfig = m.build_model, m.ModelConfig
    general = {"model": "compact", "image_size": 112, "loss": "arcface", "distance": "cosine",
               "init": "kaiming"}
    narrow = build_model(ModelConfig.from_dict({**general, "width": 16}))
    default = build_model(ModelConfig.from_dict(general))  # a config from before width
    convs = [m.out_channels for m in default.backbone.features if isinstance(m, torch.nn.Conv2d)]
    assert convs[0] == 32
    n = lambda net: sum(p.numel() for p in net.parameters())
    assert n(narrow) < n(default) / 3
    assert narrow(torch.zeros(2, 3, 112, 112)).shape == (2, 256)
    koch_cfg = {**general, "model": "koch", "loss": "bce", "distance": "l1", "image_size": 105}
    koch = build_model(koch_cfg)
    small = build_model({**koch_cfg, "width": 32, "p": 0.5})
    assert koch.backbone.out_dim == 4096 and small.backbone.out_dim == 2048  # the paper's 4096
    assert koch.backbone.features[0].out_channels == 64 and n(small) < n(koch) / 3
    assert any(isinstance(x, torch.nn.Dropout) and x.p == 0.5 for x in small.modules())
    with pytest.raises(ValueError, match="width"):
        ModelConfig.from_dict({**general, "width": -1})


def test_cos_margin_subtracts_from_the_true_class_cosine_only():
    torch.manual_seed(0)
    head = arcface(8, 5, scale=10.0, margin=0.0, cos_margin=0.35)
    e, ids = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(e),
                                     torch.nn.functional.normalize(head.weight))
    expected = torch.nn.functional.cross_entropy(
        10.0 * (cos - 0.35 * torch.nn.functional.one_hot(ids, 5)), ids)
    assert torch.allclose(head.embedding_loss(e, ids), expected, atol=1e-4)
    plain = arcface(8, 5, scale=10.0, margin=0.0)
    plain.weight.data.copy_(head.weight.data)
    assert head.embedding_loss(e, ids) > plain.embedding_loss(e, ids)  # a margin: harder
