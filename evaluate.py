"""Evaluate a trained checkpoint on an LFW pairs file: 10-fold accuracy, AUC, EER, TAR@FAR.

    python evaluate.py [CHECKPOINT | RUN_FOLDER] [--data cropped_dataset] [--pairs dataset/pairsDevTest.txt]
        [--flip] [--batch-size N] [--out DIR] [--skip-missing] [--device auto|cpu|cuda]
        [--fold K] [--identify]

Each unique image is decoded and embedded once; pairs are then scored from the cached
embeddings in one vectorised call. pairs.txt (View 2) keeps its 10 official folds; a
single-set file is cut into 10 class-balanced folds; --fold K tests on one View 2 fold with a
threshold from the other nine. Writes results.json, scores.csv, roc.png, scores.png and
errors.png to --out (default: <checkpoint folder>/eval-<pairs stem>[-flip][-foldK]/).

--identify measures 1:N identification on the same people instead: each person of the pairs
file with two or more images is enrolled with the first by file name, their other images are
mated probes and people with one image are non-mated probes. Writes results.json (rank-1,
rank-5 and the CMC; DIR at FAR 1% and 10% as BLUFR reports them), probes.csv and cmc.png to
--out (default: <checkpoint folder>/eval-identify-<pairs stem>[-flip][-foldK]/).
"""
import argparse
import csv
import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib
matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import RocCurveDisplay

import dataset as ds
import identify
import metrics
import model as m
from runtime import autocast, pick_device, set_threads, write_atomic

N_ERRORS = 8        # worst false accepts and false rejects shown in errors.png
N_MISSING = 5       # missing files named in the error


class EvalError(Exception):
    """Bad input; the message names the file and the fix."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a best_*.pt written by trainer2.py, or a run folder (its "
                        "best_accuracy.pt); default: the newest logs/<run>/best_accuracy.pt")
    p.add_argument("--data", default=None,
                   help="<person>/<image>.jpg folder (default: the checkpoint's data_dir if it "
                        "exists, else cropped_dataset)")
    p.add_argument("--pairs", default="dataset/pairsDevTest.txt",
                   help="pairs.txt (View 2, 10 folds) or pairsDevTest.txt (one set)")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out pairs whose images are missing instead of stopping")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--fold", type=int, default=None,
                   help="View 2, one fold as the test set: the threshold is chosen on the other "
                        "folds' pairs and the figures are for this fold's pairs alone")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "NEW"), default=None,
                   help="two evaluation folders of the same pairs file (their scores.csv): the "
                        "accuracy of NEW minus BASE with a paired bootstrap 95%% interval, "
                        "and with --out both ROCs in OUT/roc_compare.png; nothing is embedded")
    p.add_argument("--identify", action="store_true",
                   help="1:N identification instead of pairs, on every image of the pairs "
                        "file's people (with --fold, that fold's): rank-1/5 and the CMC "
                        "(closed set), DIR at FAR 1%% and 10%% (open set, BLUFR)")
    return p.parse_args(argv)


def choose_data(arg, ckpt):
    """(folder, where the choice came from): --data, else the checkpoint's, else the default."""
    if arg:
        return Path(arg), "--data"
    saved = ckpt.get("config", {}).get("data_dir")
    if saved and Path(saved).is_dir():
        return Path(saved), "the checkpoint's data_dir"
    why = f"the checkpoint's data_dir {saved} is absent" if saved else "default"
    return Path("cropped_dataset"), why


def drop_missing(pairs, data, skip):
    """Pairs whose images all exist, and how many were left out. Without skip, a missing
    image is an error naming the first few."""
    paths = ds.pairs_to_paths(pairs, data)
    missing = sorted({p for pa, pb, _ in paths for p in (pa, pb) if not p.is_file()})
    if not missing:
        return pairs, 0
    if not skip:
        names = ", ".join(str(p) for p in missing[:N_MISSING])
        more = f" and {len(missing) - N_MISSING} more" if len(missing) > N_MISSING else ""
        raise EvalError(f"{len(missing)} images of the pairs are missing from {data}: {names}"
                        f"{more}; crop them with `python crop_dataset_to_faces.py`, pass the "
                        "right --data, or --skip-missing to leave those pairs out")
    gone = set(missing)
    kept = [p for p, (pa, pb, _) in zip(pairs, paths) if pa not in gone and pb not in gone]
    return kept, len(pairs) - len(kept)


def pair_folds(pairs):
    """Fold id per pair and a description: the file's own folds (View 2's 10 official ones),
    or for a single-set file 10 folds with the same class mix each."""
    folds = np.array([p[5] for p in pairs])
    n = len(np.unique(folds))
    if n > 1:
        return folds, f"{n} official folds"
    return metrics.balanced_folds([p[4] for p in pairs]), "10 class-balanced folds of one set"


def make_report(scores, labels, folds, val_threshold=None):
    """Every figure for scored pairs: metrics.summary (k-fold accuracy, AUC, EER, TAR@FAR,
    precision/recall/F1 at the k-fold median threshold) and, if given, the figures at the
    checkpoint's validation threshold."""
    report = metrics.summary(scores, labels, folds)
    if val_threshold is not None:
        report["at_validation_threshold"] = metrics.threshold_metrics(scores, labels,
                                                                      val_threshold)
    return report


def contamination(pairs, ckpt):
    """How many people of the pairs the checkpoint saw in training (incl. validation)."""
    people = ds.pair_people(pairs)
    if "train_people" not in ckpt:
        return {"contaminated": None, "people_seen_in_training": None,
                "people_in_pairs": len(people)}
    seen = people & set(ckpt["train_people"])
    return {"contaminated": bool(seen), "people_seen_in_training": len(seen),
            "people_in_pairs": len(people)}


def write_scores(pairs, labels, scores, path):
    """Every pair's score, so that any figure can be recomputed or re-plotted."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name_a", "number_a", "name_b", "number_b", "same", "fold", "score"])
        for (a, i, b, j, _, fold), y, s in zip(pairs, labels, scores):
            w.writerow([a, i, b, j, int(y), fold, f"{s:.6g}"])


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------ figures

def plot_roc(curves, path):
    """curves: [(scores, labels, name)], one ROC each on one axis."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for scores, labels, name in curves:
        RocCurveDisplay.from_predictions(labels, scores, ax=ax, name=name)
    # FAR on a log axis: the low-FAR end is what verification cares about. sklearn makes the
    # axes square, which a log axis squashes.
    ax.set_xscale("log")
    ax.set_aspect("auto")
    ax.set_xlim(1 / max(1, int((labels == 0).sum())), 1)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scores(scores, labels, threshold, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(scores, bins=60)
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="same person")
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="different people")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("score (higher = same)")
    ax.set_ylabel("pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def worst_errors(scores, labels, threshold, n=N_ERRORS):
    """Indices of the highest-scoring false accepts and the lowest-scoring false rejects."""
    fa = np.flatnonzero((labels == 0) & (scores >= threshold))
    fr = np.flatnonzero((labels == 1) & (scores < threshold))
    return fa[np.argsort(-scores[fa], kind="stable")][:n], fr[np.argsort(scores[fr], kind="stable")][:n]


def plot_errors(pairs, scores, labels, threshold, images, index_a, index_b, path):
    """Rows of pairs: false accepts on the left, false rejects on the right."""
    fa, fr = worst_errors(scores, labels, threshold)
    rows = max(len(fa), len(fr), 1)
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.3 * rows + 0.4), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for col, chosen, kind in ((0, fa, "false accepts"), (2, fr, "false rejects")):
        if not len(chosen):
            axes[0, col].text(0.5, 0.5, f"no {kind}", ha="center", va="center")
        for row, k in enumerate(chosen):
            a, i, b, j, _, _ = pairs[k]
            for dc, idx, title in ((0, index_a[k], f"{a} {i}\nscore {scores[k]:.4g}"),
                                   (1, index_b[k], f"{b} {j}\n")):
                ax = axes[row, col + dc]
                ax.imshow(images[idx].permute(1, 2, 0).numpy())
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"worst false accepts (left) and false rejects (right) at threshold "
                 f"{threshold:.4g}", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ console

def print_summary(results):
    r, t = results, results["time_s"]
    k, at = r["kfold"], r["at_threshold"]
    lines = [
        f"checkpoint  {r['checkpoint']} ({r['model']}/{r['loss']}/{r['distance']}, "
        f"epoch {r['epoch']})",
        f"pairs       {r['pairs']}: {r['n_pairs']} pairs ({r['n_same']} same, {r['n_diff']} "
        f"different), {r['protocol']}"
        + (f"; skipped {r['pairs_skipped']} pairs with missing images" if r["pairs_skipped"] else ""),
        f"data        {r['data']} ({r['data_source']}), {r['images']} images, "
        f"flip {'on' if r['flip'] else 'off'}",
        f"accuracy    {k['mean']:.4f} ± {k['stderr']:.4f} (standard error; std {k['std']:.4f}) "
        f"over {len(k['fold_accuracies'])} folds",
        f"AUC         {r['auc']:.4f}",
        f"EER         {r['eer']:.4f}",
        f"TAR@FAR     {r['tar@far=1e-2']:.4f} at 1e-2, {r['tar@far=1e-3']:.4f} at 1e-3",
        f"out-of-fold each pair at its fold's threshold (median {at['threshold']:.4g}): accuracy "
        f"{at['accuracy']:.4f}, precision {at['precision']:.4f}, recall {at['recall']:.4f}, "
        f"F1 {at['f1']:.4f} (\"same\" class)",
    ]
    if "at_validation_threshold" in r:
        v = r["at_validation_threshold"]
        lines.append(f"validation  threshold {v['threshold']:.4g} (the checkpoint's): accuracy "
                     f"{v['accuracy']:.4f}, F1 {v['f1']:.4f}"
                     + ("; note: --flip sums two embeddings per image, so a threshold found "
                        "without flip may not transfer" if r["flip"] else ""))
    lines.append(f"time        decode {t['decode']:.1f} s, embed {t['embed']:.1f} s "
                 f"({r['images'] / max(t['embed'], 1e-9):.0f} images/s), score "
                 f"{t['score']:.3f} s, total {t['total']:.1f} s")
    print("\n".join(lines))
    if r["contaminated"]:
        print(f"WARNING: {r['people_seen_in_training']} of {r['people_in_pairs']} people in "
              f"{Path(r['pairs']).name} were seen in training: this result is contaminated")
    elif r["contaminated"] is None:
        print("WARNING: the checkpoint does not record its training people, so contamination "
              "cannot be checked")


# ------------------------------------------------------------------ main

def load_pairs(args, ckpt):
    """The pairs to score, the data folder and the folds; every input problem as EvalError."""
    pairs = ds.parse_pairs(args.pairs)
    data, data_source = choose_data(args.data, ckpt)
    pairs, skipped = drop_missing(pairs, data, args.skip_missing)
    labels = np.array([p[4] for p in pairs], dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise EvalError(f"{args.pairs}: after leaving out pairs with missing images, "
                        f"{len(pairs)} pairs remain and they are not both same and different; "
                        f"crop the missing images into {data} with `python crop_dataset_to_faces.py`")
    folds, protocol = pair_folds(pairs)
    if args.fold is not None and ("official" not in protocol or
                                  args.fold not in set(folds.tolist())):
        raise EvalError(f"{args.pairs}: has no official fold {args.fold}; --fold needs a pairs "
                        "file with official folds (pairs.txt has 0-9)")
    return SimpleNamespace(pairs=pairs, labels=labels, folds=folds, protocol=protocol,
                           data=data, data_source=data_source, skipped=skipped)


def test_fold(args, got, scored, ckpt):
    """One official fold as the test set, its threshold chosen on the other nine. Narrows
    `got` and `scored` to the fold and returns the report."""
    train, test = got.folds != args.fold, got.folds == args.fold
    fold_threshold = metrics.best_threshold(scored["scores"][train], got.labels[train])
    got.n_other = int(train.sum())
    got.pairs = [p for p, t in zip(got.pairs, test) if t]
    got.labels = got.labels[test]
    for key in ("scores", "a", "b"):
        scored[key] = scored[key][test]
    report = make_report(scored["scores"], got.labels, metrics.balanced_folds(got.labels),
                         ckpt.get("threshold"))
    report["test_fold"] = {"fold": args.fold, **metrics.threshold_metrics(
        scored["scores"], got.labels, fold_threshold)}
    got.protocol = f"fold {args.fold} of {got.protocol}, threshold from the other folds"
    return report


def write_outputs(out, got, scored, report, cfg):
    out.mkdir(parents=True, exist_ok=True)
    scores, labels = scored["scores"], got.labels
    write_scores(got.pairs, labels, scores, out / "scores.csv")
    threshold = report["at_threshold"]["threshold"]
    plot_roc([(scores, labels, f"{cfg['model']}/{cfg.get('loss')}")], out / "roc.png")
    plot_scores(scores, labels, threshold, out / "scores.png")
    plot_errors(got.pairs, scores, labels, threshold, scored["images"], scored["a"], scored["b"],
                out / "errors.png")


def open_checkpoint(args):
    """(device, path, net, checkpoint) for the checkpoint args name, the shipped one said."""
    device = pick_device(args.device)
    set_threads()
    path = m.resolve_checkpoint(args.checkpoint)
    if path.resolve() == m.SHIPPED:
        print(m.describe_checkpoint(path))
    net, ckpt = m.load_checkpoint(path, device)
    return device, path, net, ckpt


def evaluate(args):
    if args.identify:
        return evaluate_identification(args)
    start = time.perf_counter()
    device, path, net, ckpt = open_checkpoint(args)
    cfg = ckpt["model_config"]
    got = load_pairs(args, ckpt)
    print(f"{len(got.pairs)} pairs of {args.pairs}: embedding their images from {got.data} "
          f"({got.data_source})")
    scored = m.score_pairs(net, ds.pairs_to_paths(got.pairs, got.data),
                           lambda paths: ds.decode_all(paths, cfg["image_size"]), args.batch_size,
                           device, args.flip, amp=ckpt.get("config", {}).get("mixed_precision"))
    report = make_report(scored["scores"], got.labels, got.folds, ckpt.get("threshold")) \
        if args.fold is None else test_fold(args, got, scored, ckpt)
    out = Path(args.out) if args.out else path.parent / (
        f"eval-{Path(args.pairs).stem}{'-flip' if args.flip else ''}"
        f"{'' if args.fold is None else f'-fold{args.fold}'}")
    write_outputs(out, got, scored, report, cfg)
    results = {"checkpoint": str(path), "checkpoint_sha256": sha256(path),
               "model": cfg["model"], "loss": cfg.get("loss"), "distance": cfg.get("distance"),
               "image_size": cfg["image_size"], "epoch": ckpt.get("epoch"),
               "pairs": str(args.pairs), "protocol": got.protocol, "data": str(got.data),
               "data_source": got.data_source, "flip": args.flip,
               "images": len(scored["paths"]), "pairs_skipped": got.skipped,
               "device": str(device), **contamination(got.pairs, ckpt), **report,
               "time_s": {**scored["seconds"], "total": time.perf_counter() - start}}
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    print_summary(results)
    if args.fold is not None:
        f = report["test_fold"]
        print(f"fold {f['fold']}   accuracy {f['accuracy']:.4f} at threshold {f['threshold']:.4g} "
              f"chosen on the other folds ({got.n_other} pairs)")
    print(f"wrote results.json, scores.csv, roc.png, scores.png and errors.png to {out}")
    return 0


# ------------------------------------------------------------------ identification (--identify)

def identification_sets(people):
    """The 1:N split of {person: [image paths]}: a person with two or more images is enrolled
    with the first by file name (deterministic) and the rest are mated probes; a person with
    one image is a non-mated probe (not in the gallery). Returns (gallery, probes) as
    [(person, path)]."""
    gallery, probes = [], []
    for name in sorted(people):
        photos = sorted(people[name], key=lambda p: Path(p).name)
        if len(photos) >= 2:
            gallery.append((name, photos[0]))
        probes += [(name, p) for p in photos[len(photos) >= 2:]]
    return gallery, probes


def identification_people(args, ckpt):
    """The pairs file's people (with --fold, that official fold's) and all their images in
    the data folder; every input problem as EvalError."""
    pairs = ds.parse_pairs(args.pairs)
    if args.fold is not None:
        folds, protocol = pair_folds(pairs)
        if "official" not in protocol or args.fold not in set(folds.tolist()):
            raise EvalError(f"{args.pairs}: has no official fold {args.fold}; --fold needs a "
                            "pairs file with official folds (pairs.txt has 0-9)")
        pairs = [p for p, k in zip(pairs, folds) if k == args.fold]
    data, data_source = choose_data(args.data, ckpt)
    found, names = ds.read_identities(data), ds.pair_people(pairs)
    missing = sorted(names - set(found))
    if missing and not args.skip_missing:
        more = f" and {len(missing) - N_MISSING} more" if len(missing) > N_MISSING else ""
        raise EvalError(f"{len(missing)} people of {args.pairs} have no images in {data}: "
                        f"{', '.join(missing[:N_MISSING])}{more}; crop them with `python "
                        "crop_dataset_to_faces.py`, pass the right --data, or --skip-missing "
                        "to leave them out")
    people = {n: found[n] for n in sorted(names) if n in found}
    gallery, probes = identification_sets(people)
    if not gallery:
        raise EvalError(f"{args.pairs}: none of its people has two images in {data}, so "
                        "nobody can be enrolled; use a pairs file with matched pairs")
    return SimpleNamespace(pairs=pairs, gallery=gallery, probes=probes, data=data,
                           data_source=data_source, missing=missing, people=people)


def embed_paths(net, paths, image_size, args, device, amp):
    """Embeddings of image files, each decoded and embedded once, as model.score_pairs does
    (dataset.decode_all, then model.embed_images under the checkpoint's autocast). Returns
    (embeddings, images, seconds {decode, embed})."""
    t0 = time.perf_counter()
    images = ds.decode_all(paths, image_size)
    t1 = time.perf_counter()
    with autocast(amp, device):
        emb = m.embed_images(net, images, ds.eval_transform(), args.batch_size, device, args.flip)
    return emb, images, {"decode": t1 - t0, "embed": time.perf_counter() - t1}


def plot_cmc(curve, name, path):
    ranks = np.arange(1, len(curve) + 1)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(ranks, curve, marker="o", markersize=3, label=name)
    ax.set_xticks(ranks[::max(1, len(ranks) // 10)] if len(ranks) > 10 else ranks)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate (closed set)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_probes(probes, labels, scores, path):
    """Each probe's true person, whether it is enrolled, and the best-scoring gallery person."""
    best = scores.argmax(1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["probe", "person", "enrolled", "best_match", "best_score"])
        for (name, p), i, s in zip(probes, best, scores.max(1)):
            w.writerow([Path(p).name, name, int(name in labels), labels[i], f"{s:.6g}"])


def print_identification(r):
    lines = [f"checkpoint  {r['checkpoint']} ({r['model']}/{r['loss']}/{r['distance']}, "
             f"epoch {r['epoch']})",
             f"people      {r['pairs']}: {r['n_gallery']} enrolled (first photo each), "
             f"{r['n_mated_probes']} mated probes, {r['n_nonmated_probes']} non-mated probes "
             f"(people with one photo); data {r['data']}",
             f"closed set  rank-1 {r['rank1']:.4f}, rank-5 {r['rank5']:.4f}"]
    dirs = [f"{r[k]:.4f} at FAR {k.split('=')[1]}" for k in ("dir@far=0.01", "dir@far=0.1")
            if r[k] is not None]
    lines.append(f"open set    DIR {', '.join(dirs)}" if dirs else
                 "open set    no non-mated probes (nobody with one photo): DIR not measured")
    print("\n".join(lines))
    if r["contaminated"]:
        print(f"WARNING: {r['people_seen_in_training']} of {r['people_in_pairs']} people in "
              f"{Path(r['pairs']).name} were seen in training: this result is contaminated")


def evaluate_identification(args):
    """evaluate.py --identify: embed every image of the people once, score every probe
    against the gallery and write results.json, probes.csv and cmc.png."""
    start = time.perf_counter()
    device, path, net, ckpt = open_checkpoint(args)
    cfg = ckpt["model_config"]
    got = identification_people(args, ckpt)
    paths = [p for _, p in got.gallery + got.probes]
    print(f"{len(got.people)} people of {args.pairs}: embedding their {len(paths)} images "
          f"from {got.data} ({got.data_source})")
    emb, _, seconds = embed_paths(net, paths, cfg["image_size"], args, device,
                                  ckpt.get("config", {}).get("mixed_precision"))
    t0 = time.perf_counter()
    n = len(got.gallery)
    scores = identify.score_matrix(net, emb[n:], identify.prepare_gallery(net, emb[:n])).numpy()
    labels = [name for name, _ in got.gallery]
    report = metrics.identification_summary(scores, [name for name, _ in got.probes], labels)
    seconds["score"] = time.perf_counter() - t0
    out = Path(args.out) if args.out else path.parent / (
        f"eval-identify-{Path(args.pairs).stem}{'-flip' if args.flip else ''}"
        f"{'' if args.fold is None else f'-fold{args.fold}'}")
    out.mkdir(parents=True, exist_ok=True)
    write_probes(got.probes, labels, scores, out / "probes.csv")
    plot_cmc(report["cmc"], f"{cfg['model']}/{cfg.get('loss')}", out / "cmc.png")
    results = {"checkpoint": str(path), "checkpoint_sha256": sha256(path),
               "model": cfg["model"], "loss": cfg.get("loss"), "distance": cfg.get("distance"),
               "image_size": cfg["image_size"], "epoch": ckpt.get("epoch"),
               "pairs": str(args.pairs), "fold": args.fold, "data": str(got.data),
               "data_source": got.data_source, "flip": args.flip, "images": len(paths),
               "people_missing": len(got.missing), "device": str(device),
               "protocol": "closed set: first photo by name enrolled, the others probes; open "
                           "set: people with one photo as non-mated probes; BLUFR DIR at rank 1",
               **contamination(got.pairs, ckpt), **report,
               "time_s": {**seconds, "total": time.perf_counter() - start}}
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    print_identification(results)
    print(f"wrote results.json, probes.csv and cmc.png to {out}")
    return 0


def compare(base, new, out=None):
    """evaluate.py --compare: NEW's accuracy minus BASE's on the same pairs, paired bootstrap;
    with OUT, also both ROCs in OUT/roc_compare.png."""
    r = metrics.compare_scores(base, new)
    verdict = "no evidence of a difference" if r["low"] <= 0 <= r["high"] else \
        ("better" if r["difference"] > 0 else "worse")
    print(f"{new} against {base}: {r['difference']:+.2%} accuracy, 95% interval "
          f"[{r['low']:+.2%}, {r['high']:+.2%}] (paired bootstrap over {r['n_pairs']} pairs, "
          f"{r['n_boot']} resamples): {verdict}")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        curves = []
        for folder in (base, new):
            _, labels, _, scores = metrics.read_scores(folder)
            curves.append((scores, labels, Path(folder).parent.name or str(folder)))
        plot_roc(curves, Path(out) / "roc_compare.png")
        print(f"wrote {Path(out) / 'roc_compare.png'}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.compare:
            return compare(*args.compare, out=args.out)
        return evaluate(args)
    except (EvalError, ds.ProtocolError, m.CheckpointError, metrics.ScoresError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
