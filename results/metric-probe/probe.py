"""A probe, not a product script: would a shrunk linear metric beat a net's own cosine?

    python results/metric-probe/probe.py logs/<run> THREADS CENTER

Embeds the run's validation people's images (the people it never trained on), then, for four
random halvings of those people, fits on one half and ranks every pair of the other half's
images (ROC AUC): PCA to 64/128/256 dimensions, whitening to the power beta (0 none, 1 full),
WCCN shrunk toward the identity by alpha (1: none); CENTER 1 subtracts the fitting half's mean
embedding, 0 does not. Prints the twelve best settings and the raw cosine, mean ± std over the
halvings. Output of the runs RECIPE.md cites: output-*.txt beside this file."""
import sys, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import model as m, training, trainer2, dataset as ds, metric_learning as ml
from recipes import defaults_of
from runtime import autocast
CENTER = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
net, ckpt = m.load_checkpoint(m.resolve_checkpoint(sys.argv[1]))
cfg = training.validation_config(ckpt, defaults_of(vars(trainer2)), torch.device("cpu"))
data = training.build_data({**cfg, "cache_images": False})
paths = [p for n in sorted(data.val_people) for p in data.val_people[n]]
amp = bool(ckpt.get("config", {}).get("mixed_precision", False))
with autocast(amp, torch.device("cpu")):
    emb = m.embed_images(net, torch.stack([data.bank[p] for p in paths]), ds.eval_transform(), 128, torch.device("cpu"))
ids = np.array([p.parent.name for p in paths])
print(len(paths), "images", len(set(ids)), "people", emb.shape)
x = ml.normalised(emb)
def fit(xa, ia, dim, alpha, beta):
    # PCA to dim, whitening shrunk by beta (0 none, 1 full), WCCN shrunk by alpha
    mean = xa.mean(0) * CENTER; xc = xa - mean
    v, V = torch.linalg.eigh(xc.T @ xc / (len(xa) - 1)); v, V = v.flip(0)[:dim].clamp(min=0), V.flip(1)[:, :dim]
    proj = V / (v + 1e-6).pow(0.5 * beta)
    z = xc @ proj; k = z.shape[1]; W = torch.zeros(k, k, dtype=z.dtype); n = 0
    for p in np.unique(ia):
        zp = z[torch.from_numpy(ia == p)]
        if len(zp) > 1: d = zp - zp.mean(0); W += d.T @ d; n += len(zp) - 1
    W /= max(n, 1); W = (1 - max(alpha, 1e-3)) * W + max(alpha, 1e-3) * torch.eye(k, dtype=W.dtype) * W.trace() / k
    wv, wV = torch.linalg.eigh(W); proj = proj @ wV / wv.sqrt()
    return mean, proj
res = {}
for seed in range(4):
    A, B = ml.halves(set(ids), seed)
    a, b = np.isin(ids, A), np.isin(ids, B)
    res.setdefault("raw", []).append(ml.pair_auc(x[b].float(), ids[b]))
    for dim in (64, 128, 256):
        if dim > x.shape[1]: continue
        for beta in (0.0, 0.5, 1.0):
            for alpha in (0.0, 0.3, 0.6, 0.9, 1.0):
                mean, proj = fit(x[a], ids[a], dim, alpha, beta)
                res.setdefault(f"d{dim} b{beta} a{alpha}", []).append(ml.pair_auc(((x[b] - mean) @ proj).float(), ids[b]))
for k, v in sorted(res.items(), key=lambda kv: -np.mean(kv[1]))[:12] + [("raw", res["raw"])]:
    print(f"{k:20s} {np.mean(v):.4f} ± {np.std(v):.4f}")
