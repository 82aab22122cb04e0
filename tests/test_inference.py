"""inference.FaceModel: the one object that embeds and scores for every entry point."""
import numpy as np
import pytest
import torch

import dataset as ds
import model as m
from inference import FaceModel
from runtime import autocast

shipped = pytest.mark.skipif(not m.SHIPPED.is_file(), reason="no model is shipped in models/")


@pytest.fixture(scope="module")
def fm():
    return FaceModel.load(m.SHIPPED)


@pytest.fixture(scope="module")
def astronaut_faces(fm):
    """The astronaut's face and her mirror image's, as the shipped model's crops are made."""
    from skimage.data import astronaut
    photo = torch.from_numpy(astronaut()).permute(2, 0, 1).contiguous()
    return [fm.face(photo)[0], fm.face(photo.flip(2))[0]]


@shipped
def test_it_carries_what_the_checkpoint_says(fm):
    ckpt = torch.load(m.SHIPPED, weights_only=True)
    assert fm.image_size == ckpt["model_config"]["image_size"] == 112
    assert fm.amp is ckpt["config"]["mixed_precision"] is True
    assert fm.threshold == pytest.approx(ckpt["threshold"])
    assert fm.settings["size"] == ckpt["crop"]["size"] and fm.shipped
    assert len(fm.sha256) == 64


@shipped
def test_embed_fits_the_input_size_and_uses_the_checkpoints_precision(fm, astronaut_faces):
    """Crops of another size are fitted as evaluation fits them, and embedded in bf16 as
    validation embedded them: the same numbers as doing both by hand."""
    crops = [ds.fit(c, 96) for c in astronaut_faces]  # not the net's 112 px
    got = fm.embed(crops)
    x = torch.stack([ds.fit(c, 112) for c in crops])
    with autocast(True, torch.device("cpu")):
        want = m.embed_images(fm.net, x, ds.eval_transform())
    assert got.shape == (2, 256) and got.dtype == torch.float32
    assert torch.equal(got, want)
    fp32 = m.embed_images(fm.net, x, ds.eval_transform())
    assert not torch.equal(got, fp32)  # precision matters: the reason it is carried


@shipped
def test_score_matrix_is_the_pair_score_for_every_pair(fm, astronaut_faces):
    e = fm.embed(astronaut_faces + [astronaut_faces[0].flip(1)])
    matrix = fm.score_matrix(e, fm.prepare_gallery(e))
    pairs = fm.score(e.repeat_interleave(3, 0), e.repeat(3, 1)).view(3, 3)
    assert matrix.numpy() == pytest.approx(pairs.numpy(), abs=1e-5)
    assert fm.score_faces(*astronaut_faces) == pytest.approx(float(matrix[0, 1]), abs=1e-5)


def test_a_learned_head_scores_the_same_through_the_matrix(tmp_path):
    """An L1 net with a bce head (the paper's recipe): the chunked matrix path gives each
    pair's head score."""
    cfg = {"model": "compact", "image_size": 32, "embedding_dim": 16, "loss": "bce",
           "distance": "l1", "init": "default"}
    net = m.build_model(cfg).eval()
    ckpt = {"model_config": m.ModelConfig.from_dict(cfg).to_dict(), "threshold": 0.0,
            "config": {"mixed_precision": False}}
    fm = FaceModel(net, ckpt, tmp_path / "x.pt")
    crops = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (4, 3, 32, 32),
                                                                dtype=np.uint8))
    e = fm.embed(crops)
    matrix = fm.score_matrix(e[:2], fm.prepare_gallery(e))
    pairs = fm.score(e[:2].repeat_interleave(4, 0), e.repeat(2, 1)).view(2, 4)
    assert matrix.numpy() == pytest.approx(pairs.numpy(), abs=1e-5)
    assert fm.amp is False and len(fm.embed([])) == 0
