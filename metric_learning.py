"""A metric learned on top of a net's embeddings: PCA whitening, then within-class covariance
normalisation (WCCN), both one linear map fitted in seconds on people the net never trained
on. A pair is then scored by the cosine of the mapped embeddings, so the map is a layer of the
network (model.MetricBackbone) and every entry point scores with it.

Why it can help: cosine on the raw embedding weighs every direction alike, but the directions
in which one person's photos vary (pose, light) carry no identity. Whitening makes the total
spread round; WCCN then shrinks the within-person directions, as LDA would, without needing
more people than dimensions.
"""
import numpy as np
import torch
import torch.nn.functional as F

import metrics

DIMS = (32, 64, 128, 256)     # PCA dimensions tried (those up to the embedding's size)
KINDS = ("whiten", "wccn")
RIDGE = 1e-3                  # added to the eigenvalues: a direction of no spread stays finite


def normalised(emb):
    return F.normalize(torch.as_tensor(emb).double(), dim=1)


def fit(emb, ids, dim, kind="wccn"):
    """(mean (D,), projection (D, k)) of embeddings of labelled images: the top-`dim` PCA
    directions whitened, then, for "wccn", the within-person covariance made the identity."""
    x = normalised(emb)
    mean = x.mean(0)
    xc = x - mean
    values, vectors = torch.linalg.eigh(xc.T @ xc / max(len(x) - 1, 1))
    k = min(dim, x.shape[1], max(len(x) - 1, 1))
    top = values.flip(0)[:k].clamp(min=0) + RIDGE
    proj = vectors.flip(1)[:, :k] / top.sqrt()
    if kind == "wccn":
        z = xc @ proj
        ids = np.asarray(ids)
        within = torch.zeros(k, k, dtype=z.dtype)
        for person in np.unique(ids):
            zp = z[torch.from_numpy(ids == person)]
            if len(zp) > 1:
                d = zp - zp.mean(0)
                within += d.T @ d
        within /= max(len(z) - len(np.unique(ids)), 1)
        w_values, w_vectors = torch.linalg.eigh(within + RIDGE * torch.eye(k, dtype=z.dtype))
        proj = proj @ w_vectors / w_values.sqrt()
    return mean.float(), proj.float()


def apply(emb, mean, proj):
    return (normalised(emb).float() - mean) @ proj


def pair_auc(emb, ids):
    """ROC AUC of the cosine over every pair of the images (same person against not)."""
    e = F.normalize(torch.as_tensor(emb).float(), dim=1)
    ids = np.asarray(ids)
    i, j = np.triu_indices(len(e), 1)
    scores = (e @ e.T).numpy()[i, j]
    same = ids[i] == ids[j]
    if same.all() or not same.any():
        raise ValueError("the pairs need same- and different-person ones to rank")
    return metrics.roc_auc(scores, same.astype(int))


def halves(names, seed=0):
    """Sorted names split in two at random: the first to fit on, the second to test on."""
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    cut = len(names) // 2
    return sorted(names[i] for i in order[:cut]), sorted(names[i] for i in order[cut:])


def select(emb, ids, seed=0):
    """The (kind, dim) with the best pair AUC when fitted on half of these people and tested
    on the other half, and the AUC of every choice (raw: the net's own cosine)."""
    ids = np.asarray(ids)
    fit_names, test_names = halves(set(ids), seed)
    a, b = np.isin(ids, fit_names), np.isin(ids, test_names)
    emb = torch.as_tensor(emb)
    tried = {"raw": pair_auc(emb[b], ids[b])}
    for kind in KINDS:
        for dim in DIMS:
            if dim > emb.shape[1] and dim != DIMS[0]:
                continue
            mean, proj = fit(emb[a], ids[a], dim, kind)
            tried[f"{kind}-{proj.shape[1]}"] = pair_auc(apply(emb[b], mean, proj), ids[b])
    best = max((k for k in tried if k != "raw"), key=tried.get)
    kind, dim = best.rsplit("-", 1)
    return kind, int(dim), tried
