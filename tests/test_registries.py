"""The backbone and loss registries: a new entry is all a new backbone or loss needs, the
traps of string dispatch are gone, and validation computes the loss the run trains."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import dataset as ds
import losses
import model as m
import recipes
import trainer2
import training
from conftest import tiny_args


# ---------------------------------------------------------------- a toy backbone, one entry

class TinyNet(nn.Module):
    """Average-pooled colour, one linear layer: the smallest network that keeps the contract."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, dim)
        self.out_dim = dim

    def forward(self, x):
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1))

    def pretrained_parameters(self):
        return []


@pytest.fixture
def tiny_backbone(monkeypatch):
    """Registered for one test only, exactly as a new entry in backbones.py would be."""
    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))
    backbones.register("tiny", "a test backbone", settings={"tiny_dim": (24, "embedding size")},
                       limits={"tiny_dim": (1, None)})(lambda cfg, pretrained:
                                                       TinyNet(cfg.get("tiny_dim")))


def test_a_registered_backbone_trains_evaluates_and_reloads(synthetic_lfw, tmp_path,
                                                            tiny_backbone):
    run_dir = tmp_path / "tiny"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, run_dir, epochs=1,
                                                   model="tiny", tiny_dim=12)) == 0
    net, ckpt = m.load_checkpoint(run_dir / "best_accuracy.pt")
    assert isinstance(net.backbone, TinyNet) and net.backbone.out_dim == 12
    assert ckpt["model_config"]["tiny_dim"] == 12 and "embedding_dim" not in ckpt["model_config"]
    assert "tiny_dim" in recipes.help_text(vars(trainer2))


def test_a_backbone_setting_is_checked_where_it_is_declared(tiny_backbone):
    general = {"model": "tiny", "image_size": 32, "loss": "arcface", "distance": "cosine",
               "init": "kaiming"}
    assert m.ModelConfig.from_dict(general).get("tiny_dim") == 24  # the registry's default
    with pytest.raises(ValueError, match="tiny_dim=0 must be at least 1"):
        m.ModelConfig.from_dict({**general, "tiny_dim": 0})
    with pytest.raises(ValueError, match="model='nope' is not one of koch, compact, resnext"):
        m.ModelConfig.from_dict({**general, "model": "nope"})


def test_one_setting_name_has_one_default_across_backbones(monkeypatch):
    monkeypatch.setattr(backbones, "BACKBONES", dict(backbones.BACKBONES))
    with pytest.raises(ValueError, match="setting p defaults to 0.3 but koch's to 0.0"):
        backbones.register("other", "", settings={"p": (0.3, "dropout")})(lambda c, p: None)


def test_every_backbone_keeps_the_contract():
    general = {"image_size": 64, "loss": "arcface", "distance": "cosine", "init": "kaiming"}
    for name in backbones.BACKBONES:
        size = 84 if name == "koch" else 64
        cfg = m.ModelConfig.from_dict({**general, "model": name, "image_size": size,
                                       "head_hidden": 8})
        net = backbones.BACKBONES[name].build(cfg, False).eval()
        assert net(torch.zeros(2, 3, size, size)).shape == (2, net.out_dim), name
        assert net.pretrained_parameters() == [], name  # from scratch: nothing came from outside


# ---------------------------------------------------------------- a toy loss, one class

@pytest.fixture
def cosine_pairs_loss(monkeypatch):
    """A new loss as it would be added to losses.py: pairs, scored by distance."""
    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))

    @losses.register
    class CosinePairs(losses.Loss):
        name, batches = "cosine_pairs", "pairs"
        settings = {"pair_target": (0.8, "cosine a same-person pair is pulled towards")}

        def __init__(self, out_dim, n_classes, distance, pair_target):
            super().__init__(out_dim, n_classes, distance)
            self.target = pair_target

        def pair_loss(self, e1, e2, y):
            cos = F.cosine_similarity(e1, e2)
            return (y.float() * (self.target - cos).relu() + (1 - y.float()) * cos.relu()).mean()

        def forward(self, net, x1, x2, y):
            return self.pair_loss(*net(torch.cat([x1, x2])).chunk(2), y)

        def validation_loss(self, scores, emb, a, b, y, ids):
            return self.pair_loss(emb[a], emb[b], y)
    return CosinePairs


def test_a_registered_loss_trains_with_its_batches_and_its_own_validation_loss(
        synthetic_lfw, tmp_path, cosine_pairs_loss, monkeypatch):
    kinds = []
    real = losses.LOSSES["cosine_pairs"].forward
    monkeypatch.setattr(cosine_pairs_loss, "forward",
                        lambda self, net, x1, x2, y: kinds.append(x2 is not None) or
                        real(self, net, x1, x2, y))
    run_dir = tmp_path / "toy"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, run_dir, epochs=1,
                                                   loss="cosine_pairs", distance="cosine",
                                                   pairs_per_epoch=64, pair_target=0.6)) == 0
    assert kinds and all(kinds)  # pair batches, as the loss declared
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert cfg["pair_target"] == 0.6
    net, ckpt = m.load_checkpoint(run_dir / "best_loss.pt")
    assert net.head is None  # scored by distance: no learned head


def test_a_loss_asking_for_batches_nobody_makes_is_refused(monkeypatch):
    monkeypatch.setattr(losses, "LOSSES", dict(losses.LOSSES))
    with pytest.raises(ValueError, match="batches='quadruplets' is not one of pairs, people"):
        @losses.register
        class Odd(losses.Loss):
            name, batches = "odd", "quadruplets"


def test_each_loss_gets_the_batches_it_declares(synthetic_lfw):
    cfg = recipes.defaults_of(vars(trainer2))
    cfg = {**cfg, **{k: v for k, v in (a[2:].split("=", 1) for a in tiny_args(synthetic_lfw, "x"))},
           "batch_size": 16, "num_workers": 0, "seed": 0, "pairs_per_epoch": 32, "per_person": 4,
           "val_fraction": 0.25, "val_pairs": 40, "slice_of_data": 0, "cache_images": False,
           "image_size": 32, "fold": 0, "batch_augment": True, "augment_p": 0.5, "erase_p": 0.0}
    data = training.build_data(cfg)
    for name, cls in losses.LOSSES.items():
        batch = next(iter(training.epoch_loader({**cfg, "loss": name}, data, 0, 0, 1)))
        x1, x2, y = training.unpack(batch, name)
        assert (x2 is not None) == (cls.batches == "pairs"), name
        if cls.batches == "people":  # P people x K images, K = per_person
            assert set(torch.bincount(y)[torch.bincount(y) > 0].tolist()) == {4}


# ---------------------------------------------------------------- validation loss

def validation_inputs(n_people=5, per=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n_people).repeat_interleave(per)
    emb = torch.randn(n_people, dim, generator=g)[ids] + 0.3 * torch.randn(len(ids), dim, generator=g)
    a, b = torch.tensor([0, 3, 6, 1]), torch.tensor([1, 4, 9, 12])
    y = (ids[a] == ids[b]).long()
    scores = F.cosine_similarity(emb[a], emb[b])
    return scores, emb, a, b, y, ids


def test_arcface_validation_loss_is_arcface_on_the_validation_peoples_mean_embeddings():
    scores, emb, a, b, y, ids = validation_inputs()
    cfg = {**recipes.defaults_of(vars(trainer2)), "arc_margin": 0.3, "arc_scale": 16.0}
    loss = losses.build_loss(cfg, emb.shape[1], 1)
    got = loss.validation_loss(scores, emb, a, b, y, ids)
    centres = torch.stack([F.normalize(emb[ids == k]).mean(0) for k in range(5)])
    cos = F.normalize(emb) @ F.normalize(centres).T
    true = cos.gather(1, ids[:, None]).clamp(-1, 1)
    logits = cos.scatter(1, ids[:, None], torch.cos(torch.acos(true) + 0.3)) * 16.0
    assert got.item() == pytest.approx(F.cross_entropy(logits, ids).item(), rel=1e-4)
    # not the contrastive loss that validation used to report for ArcFace runs
    old = losses.contrastive_loss(emb[a], emb[b], y, "cosine", 0.5)
    assert got.item() != pytest.approx(old.item(), rel=1e-2)


def test_triplet_and_contrastive_validation_losses_use_their_own_margins():
    scores, emb, a, b, y, ids = validation_inputs()
    cfg = {**recipes.defaults_of(vars(trainer2)), "distance": "cosine",
           "triplet_margin": 0.7, "contrastive_margin": 0.2}
    triplet = losses.build_loss({**cfg, "loss": "triplet"}, 8, 1)
    assert triplet.validation_loss(scores, emb, a, b, y, ids).item() == pytest.approx(
        losses.batch_hard_triplet_loss(emb, ids, "cosine", 0.7).item())
    contrastive = losses.build_loss({**cfg, "loss": "contrastive"}, 8, 1)
    assert contrastive.validation_loss(scores, emb, a, b, y, ids).item() == pytest.approx(
        losses.contrastive_loss(emb[a], emb[b], y, "cosine", 0.2).item())


def test_best_loss_of_an_arcface_run_is_chosen_on_the_arcface_validation_loss(synthetic_lfw,
                                                                             tmp_path):
    run_dir = tmp_path / "arc"
    assert training.main(vars(trainer2), tiny_args(synthetic_lfw, run_dir, epochs=2)) == 0
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    split = ds.make_split(cfg["data_dir"], cfg["protocol_dir"], cfg["split"], cfg["seed"],
                          cfg["val_fraction"], cfg["val_pairs"])
    net, ckpt = m.load_checkpoint(run_dir / "best_loss.pt")
    paths = sorted({p for pa, pb, _ in split["val_pairs"] for p in (pa, pb)})
    images = torch.stack([ds.load_image(p, 32) for p in paths])
    with torch.no_grad():
        emb = m.embed_images(net, images, ds.eval_transform()).float()
    names = sorted({p.parent.name for p in paths})
    ids = torch.tensor([names.index(p.parent.name) for p in paths])
    want = losses.build_loss(cfg, emb.shape[1], 1).validation_loss(None, emb, None, None, None, ids)
    # bf16 embedding in training against fp32 here: the same loss to a few per cent
    assert ckpt["metrics"]["loss"] == pytest.approx(want.item(), rel=0.05)
