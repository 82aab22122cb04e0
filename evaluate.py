"""Evaluate a trained checkpoint on verification pairs: 10-fold accuracy, AUC, EER, TAR@FAR.

    python evaluate.py [CHECKPOINT | RUN_FOLDER] [--data cropped_dataset] [--pairs FILE]
        [--flip] [--batch-size N] [--out DIR] [--skip-missing] [--device auto|cpu|cuda]
        [--fold K] [--identify]

--pairs takes any file pairs.read_pairs reads: LFW's protocol files (names under --data), a
CSV (path_a,path_b,same[,fold]; relative paths start at --data, else at the CSV's folder) or
an insightface .bin (LFW, CFP-FP, AgeDB-30, ...: its images inside it). Without --pairs, a
--split=random run's own held-out pairs (logs/<run>/test_pairs.csv, paths relative to the
run's data_dir) are scored, else dataset/pairsDevTest.txt. The images must be face crops
made as the training crops were (crop_dataset_to_faces.py; a .bin holds aligned faces).

The checkpoint is loaded as an inference.FaceModel, so its images are embedded at its input
size and in its precision, as verify.py embeds. Each unique image is decoded and embedded
once; pairs are then scored from the cached embeddings in one vectorised call. pairs.txt
(View 2) keeps its 10 official folds, a .bin insightface's 10 folds of consecutive pairs, a
CSV its fold column; a file without folds is cut into 10 class-balanced folds; --fold K
tests on one fold of the file with a threshold from the others. Writes results.json,
scores.csv (path_a,path_b,same,fold,score: the paths relative to the image folder), roc.png,
scores.png and errors.png to --out (default: <checkpoint folder>/eval-<pairs
stem>[-flip][-foldK]/; for a checkpoint in models/, the shipped model, which git tracks,
logs/shipped-<name>-<sha256 prefix>/eval-.../ instead, a folder git ignores: see
default_out).

--identify measures 1:N identification on the same people instead (an LFW file or a CSV of
<person>/<image> paths in one folder; a .bin names nobody): each person of the pairs file
with two or more images is enrolled with the first by file name, their other images are
mated probes and people with one image are non-mated probes. Writes results.json (rank-1,
rank-5 and the CMC; DIR at FAR 1% and 10% as BLUFR reports them), probes.csv and cmc.png to
--out (default: <checkpoint folder>/eval-identify-<pairs stem>[-flip][-foldK]/, or under
logs/ for the shipped model, as above).

--all-pairs scores every pair among all the images of the pairs file's people instead (BLUFR's
verification protocol, Liao et al. 2014): each image embedded once, then, for each fold of a
file with folds (View 2's folds share no person; --fold K: that fold only), every pair of
that fold's images. The TAR at FAR 1e-2, 1e-3 and 1e-4 is read at the checkpoint's own
thresholds, fitted on its validation people (with the FAR each really gives on the test
pairs), and, as BLUFR reports it, at thresholds fitted on the test's own different-person
pairs. Exact: every same-person score and the highest 10% of the different-person ones are
kept (operating_points.py), which every threshold at FAR <= 0.1 depends on. Writes
results.json (with the number of pairs each figure rests on) and roc.png (down to FAR 1e-4)
to --out (default: eval-all-pairs-<pairs stem>[-flip][-foldK]/ beside the checkpoint).

--compare BASE NEW reads the scores.csv of two such folders; a file that lacks a column, has
a short row, a score that is not a finite number or no pair at all is one line naming it and
the line. Exit status: 0 done, 2 an error (one line on stderr naming the file and the fix).
"""
import argparse
import csv
import io
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
import metrics
import model as m
import operating_points as op
import pairs as pr
from inference import FaceModel
from runtime import DeviceError, pick_device, set_threads, write_atomic
from training import TEST_PAIRS

N_ERRORS = 8        # worst false accepts and false rejects shown in errors.png
N_MISSING = 5       # missing files named in the error
DEFAULT_PAIRS = Path("dataset/pairsDevTest.txt")
ONE_SET = "10 class-balanced folds of one set"  # the protocol of a file without folds
FOLD_KINDS = {".bin": "consecutive folds (insightface's protocol)", ".csv": "folds of the file"}


class EvalError(Exception):
    """Bad input; the message names the file and the fix."""


def positive_int(text):
    """argparse type: a whole number of 1 or more (--batch-size 0 would embed nothing)."""
    value = int(text)  # a ValueError is argparse's "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="a best_*.pt written by trainer2.py, or a run folder (its "
                        "best_accuracy.pt); default: the newest logs/<run>/best_accuracy.pt")
    p.add_argument("--data", default=None,
                   help="the <person>/<image>.jpg folder an LFW file's names are in (default: "
                        "the checkpoint's data_dir if it exists, else cropped_dataset), or the "
                        "folder a CSV's relative paths start at (default: the CSV's folder)")
    p.add_argument("--pairs", default=None,
                   help="pairs.txt (View 2, 10 folds), pairsDevTest.txt (one set), a CSV "
                        "(path_a,path_b,same[,fold]) or an insightface .bin; default: the run's "
                        f"own {TEST_PAIRS} (a --split=random run), else {DEFAULT_PAIRS}")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="images embedded per forward pass (1 or more)")
    p.add_argument("--out", default=None,
                   help="output folder, new or existing (default: <checkpoint "
                        "folder>/eval-<pairs stem>/; for the shipped model in models/, which "
                        "git tracks, logs/shipped-<name>-<sha256 prefix>/eval-<pairs stem>/)")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out pairs whose images are missing instead of stopping")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--fold", type=int, default=None,
                   help="one fold of a file with folds (pairs.txt, a .bin, a CSV's fold column) "
                        "as the test set: the threshold is chosen on the other folds' pairs and "
                        "the figures are for this fold's pairs alone")
    p.add_argument("--all-pairs", action="store_true",
                   help="score every pair among the images of the pairs file's people "
                        "(per fold), BLUFR-style: TAR at FAR 1e-2, 1e-3, 1e-4")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "NEW"), default=None,
                   help="two evaluation folders of the same pairs file (their scores.csv): the "
                        "accuracy of NEW minus BASE with a paired bootstrap 95%% interval, "
                        "and with --out both ROCs in OUT/roc_compare.png; nothing is embedded")
    p.add_argument("--identify", action="store_true",
                   help="1:N identification instead of pairs, on every image of the pairs "
                        "file's people (with --fold, that fold's): rank-1/5 and the CMC "
                        "(closed set), DIR at FAR 1%% and 10%% (open set, BLUFR)")
    return p.parse_args(argv)


def choose_pairs(arg, fm):
    """The pairs file: --pairs, else the run's own held-out pairs (TEST_PAIRS, written by a
    --split=random run beside its checkpoints), else View 1's DEFAULT_PAIRS."""
    if arg:
        return Path(arg)
    own = fm.path.parent / TEST_PAIRS
    return own if own.is_file() else DEFAULT_PAIRS


def choose_data(arg, pairs_path, fm):
    """(folder, where the choice came from) the pairs' images are read from: for a .bin the
    file itself; else --data; else for a CSV its own folder, but for a run's own TEST_PAIRS
    the run's data_dir (training writes its paths relative to it); else for an LFW file the
    checkpoint's data_dir if it exists, else cropped_dataset."""
    suffix = pairs_path.suffix.lower()
    if suffix == ".bin":
        return pairs_path, "the images inside the .bin"
    if arg:
        return Path(arg), "--data"
    saved = fm.ckpt.get("config", {}).get("data_dir")
    own = saved and pairs_path.resolve() == (fm.path.parent / TEST_PAIRS).resolve()
    if suffix == ".csv" and not own:
        return pairs_path.parent, "the CSV's folder"
    if saved and (own or Path(saved).is_dir()):
        return Path(saved), "the checkpoint's data_dir"
    why = f"the checkpoint's data_dir {saved} is absent" if saved else "default"
    return Path("cropped_dataset"), why


def drop_missing(pairs, images, data, skip):
    """Pairs whose images all exist (in the .bin or on disk), and how many were left out.
    Without skip, a missing image is an error naming the first few."""
    missing = pr.missing_images(pairs, images)
    if not missing:
        return pairs, 0
    if not skip:
        names = ", ".join(str(p) for p in missing[:N_MISSING])
        more = f" and {len(missing) - N_MISSING} more" if len(missing) > N_MISSING else ""
        raise EvalError(f"{len(missing)} images of the pairs are missing from {data}: {names}"
                        f"{more}; crop them with `python crop_dataset_to_faces.py`, pass the "
                        "right --data, or --skip-missing to leave those pairs out")
    gone = set(missing)
    kept = [p for p in pairs if p.path_a not in gone and p.path_b not in gone]
    return kept, len(pairs) - len(kept)


def pair_folds(pairs, path=None):
    """Fold id per pair and a description: the file's own folds (View 2's 10 official ones,
    a .bin's 10 of consecutive pairs, a CSV's fold column), or for a file without folds
    (pairsDevTest.txt, a CSV without the column) 10 folds with the same class mix each."""
    if all(p.fold is not None for p in pairs):  # a reader gives every pair a fold, or none
        folds = np.array([p.fold for p in pairs])
        n = len(np.unique(folds))
        if n > 1:
            return folds, f"{n} {FOLD_KINDS.get(Path(path or '').suffix.lower(), 'official folds')}"
    return metrics.balanced_folds([p.same for p in pairs]), ONE_SET


def check_fold(fold, folds, protocol, path):
    """EvalError unless --fold names one of the file's own folds."""
    if fold is not None and (protocol == ONE_SET or fold not in set(folds.tolist())):
        raise EvalError(f"{path}: has no official fold {fold}; --fold needs a pairs file with "
                        "folds of its own (pairs.txt and a .bin have 0-9, a CSV its fold "
                        "column)")


def check_fold_sizes(fold, folds, labels, path):
    """EvalError unless --fold's pairs can be scored: the other folds choose its threshold
    (both classes needed) and its own figures cut it into balanced folds (2 of each)."""
    test = folds == fold
    inside, outside = labels[test], labels[~test]
    if min((inside == 1).sum(), (inside == 0).sum()) < 2 or len(np.unique(outside)) < 2:
        raise EvalError(f"{path}: fold {fold} has {int((inside == 1).sum())} same and "
                        f"{int((inside == 0).sum())} different pairs, and the other folds "
                        f"{'both kinds' if len(np.unique(outside)) == 2 else 'one kind'}; "
                        "--fold needs at least 2 of each in the fold and both kinds outside it")


def make_report(scores, labels, folds, val_threshold=None):
    """Every figure for scored pairs: metrics.summary (k-fold accuracy, AUC, EER, TAR@FAR,
    precision/recall/F1 at the k-fold median threshold) and, if given, the figures at the
    checkpoint's validation threshold."""
    report = metrics.summary(scores, labels, folds)
    if val_threshold is not None:
        report["at_validation_threshold"] = metrics.threshold_metrics(scores, labels,
                                                                      val_threshold)
    return report


def contamination(pairs, images, ckpt):
    """How many people of the pairs the checkpoint saw in training (incl. validation): the
    <person> folders of their images. None where it cannot be told: a .bin names nobody,
    and an old checkpoint may not record its training people."""
    people = pr.people_of(pairs, images)
    if people is None or "train_people" not in ckpt:
        return {"contaminated": None, "people_seen_in_training": None,
                "people_in_pairs": None if people is None else len(people)}
    seen = people & set(ckpt["train_people"])
    return {"contaminated": bool(seen), "people_seen_in_training": len(seen),
            "people_in_pairs": len(people)}


def shown(path, root):
    """An image as scores.csv names it: relative to the image folder (an LFW file's --data,
    a CSV's folder, a .bin's folder), so that evaluations of one pairs file from two crop
    folders can be compared; else as given."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def write_table(path, header, rows):
    """A CSV, atomically: a kill never leaves half a table for --compare to read."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    write_atomic(path, out.getvalue())


def write_scores(got, scores, path):
    """Every pair's score, so that any figure can be recomputed or re-plotted."""
    root = got.data.parent if got.images else got.data
    write_table(path, metrics.SCORE_COLUMNS,
                ([shown(p.path_a, root), shown(p.path_b, root), int(y), int(k), f"{s:.6g}"]
                 for p, y, k, s in zip(got.pairs, got.labels, got.folds, scores)))


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


def image_title(path, inside):
    """An image's title in errors.png: its person folder and file, or for an image inside a
    .bin (which names nobody) its place there."""
    path = Path(path)
    return path.name if inside else f"{path.parent.name}\n{path.name}"


def plot_errors(pairs, scores, labels, threshold, images, index_a, index_b, path, inside=None):
    """Rows of pairs: false accepts on the left, false rejects on the right. inside: the
    .bin's images (read_pairs'), whose paths name no person."""
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
            a, b = (image_title(p, inside and p in inside) for p in pairs[k][:2])
            for dc, idx, title in ((0, index_a[k], f"{a}\nscore {scores[k]:.4g}"),
                                   (1, index_b[k], f"{b}\n")):
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
        why = "the images of a .bin name no people" if r["people_in_pairs"] is None else \
            "the checkpoint does not record its training people"
        print(f"WARNING: {why}, so contamination cannot be checked")


# ------------------------------------------------------------------ main

def load_pairs(args, fm):
    """The pairs to score (pairs.Pair each), their images, the folds; every input problem
    as EvalError or ProtocolError."""
    path = choose_pairs(args.pairs, fm)
    data, data_source = choose_data(args.data, path, fm)
    found, images = pr.read_pairs(path, data)
    found, skipped = drop_missing(found, images, data, args.skip_missing)
    labels = np.array([p.same for p in found], dtype=np.int64)
    if len(np.unique(labels)) < 2 and skipped:
        raise EvalError(f"{path}: after leaving out pairs with missing images, "
                        f"{len(found)} pairs remain and they are not both same and different; "
                        f"crop the missing images into {data} with `python crop_dataset_to_faces.py`")
    if len(np.unique(labels)) < 2:
        raise EvalError(f"{path}: all {len(found)} pairs are "
                        f"{'same' if len(found) and labels[0] == 1 else 'different'}-person "
                        "pairs; accuracy and ROC need both kinds, so add the other kind")
    folds, protocol = pair_folds(found, path)
    if len(np.unique(folds)) < 2:  # each fold's threshold is chosen on the other folds
        raise EvalError(f"{path}: {len(found)} pairs are too few to cut into folds; give at "
                        "least 2 same and 2 different pairs (LFW's files have 300 of each a fold)")
    check_fold(args.fold, folds, protocol, path)
    if args.fold is not None:
        check_fold_sizes(args.fold, folds, labels, path)
    return SimpleNamespace(path=path, pairs=found, images=images, labels=labels, folds=folds,
                           protocol=protocol, data=data, data_source=data_source,
                           skipped=skipped)


def test_fold(args, got, scored, fm):
    """One fold of the file as the test set, its threshold chosen on the others. Narrows
    `got` and `scored` to the fold and returns the report."""
    train, test = got.folds != args.fold, got.folds == args.fold
    fold_threshold = metrics.best_threshold(scored["scores"][train], got.labels[train])
    got.n_other = int(train.sum())
    got.pairs = [p for p, t in zip(got.pairs, test) if t]
    got.labels, got.folds = got.labels[test], got.folds[test]
    for key in ("scores", "a", "b"):
        scored[key] = scored[key][test]
    report = make_report(scored["scores"], got.labels, metrics.balanced_folds(got.labels),
                         fm.threshold)
    report["test_fold"] = {"fold": args.fold, **metrics.threshold_metrics(
        scored["scores"], got.labels, fold_threshold)}
    got.protocol = f"fold {args.fold} of {got.protocol}, threshold from the other folds"
    return report


def write_outputs(out, got, scored, report, cfg):
    out.mkdir(parents=True, exist_ok=True)
    scores, labels = scored["scores"], got.labels
    write_scores(got, scores, out / "scores.csv")
    threshold = report["at_threshold"]["threshold"]
    plot_roc([(scores, labels, f"{cfg['model']}/{cfg.get('loss')}")], out / "roc.png")
    plot_scores(scores, labels, threshold, out / "scores.png")
    plot_errors(got.pairs, scores, labels, threshold, scored["images"], scored["a"], scored["b"],
                out / "errors.png", got.images)


def default_out(fm, name):
    """Where results go without --out: beside the checkpoint, <its folder>/NAME, as a run's
    own files are; but for a checkpoint in models/ (the shipped model), which git tracks,
    logs/shipped-<stem>-<first 10 hex of its SHA-256>/NAME, which git ignores, so that
    evaluating never changes the repository's files, and a newly shipped model gets its own
    folder. No best_*.pt lies there, so it is never taken for a training run."""
    if fm.path.resolve().parent == m.SHIPPED.resolve().parent:
        return Path("logs") / f"shipped-{fm.path.stem}-{fm.sha256[:10]}" / name
    return fm.path.parent / name


def out_folder(args, fm, pairs_path, kind=""):
    """--out, else default_out's eval-<kind><pairs stem>[-flip][-foldK]."""
    if args.out:
        return Path(args.out)
    return default_out(fm, f"eval-{kind}{pairs_path.stem}{'-flip' if args.flip else ''}"
                           f"{'' if args.fold is None else f'-fold{args.fold}'}")


def check_out(out):
    """EvalError when --out names something that is not a folder: before any work, so that
    nothing is embedded for results that could not be written."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise EvalError(f"--out {out}: a file, not a folder; pass a new or existing folder")


def open_model(args):
    """The inference.FaceModel args name (the newest run's, else the shipped one, said)."""
    device = pick_device(args.device)
    set_threads()
    fm = FaceModel.load(args.checkpoint, device)
    if fm.shipped:
        print(fm.describe())
    return fm


def model_fields(fm):
    """What results.json says of the checkpoint."""
    cfg = fm.ckpt["model_config"]
    return {"checkpoint": str(fm.path), "checkpoint_sha256": fm.sha256, "model": cfg["model"],
            "loss": cfg.get("loss"), "distance": cfg.get("distance"),
            "image_size": fm.image_size, "epoch": fm.ckpt.get("epoch")}


def evaluate(args):
    if args.identify:
        return evaluate_identification(args)
    if args.all_pairs:
        return evaluate_all_pairs(args)
    start = time.perf_counter()
    fm = open_model(args)
    got = load_pairs(args, fm)
    print(f"{len(got.pairs)} pairs of {got.path}: embedding their images from {got.data} "
          f"({got.data_source})")
    scored = fm.score_pairs(got.pairs, pr.images_of_for(got.images, fm.image_size),
                            args.batch_size, args.flip)
    report = make_report(scored["scores"], got.labels, got.folds, fm.threshold) \
        if args.fold is None else test_fold(args, got, scored, fm)
    out = out_folder(args, fm, got.path)
    write_outputs(out, got, scored, report, fm.ckpt["model_config"])
    results = {**model_fields(fm), "pairs": str(got.path), "protocol": got.protocol,
               "data": str(got.data), "data_source": got.data_source, "flip": args.flip,
               "images": len(scored["paths"]), "pairs_skipped": got.skipped,
               "device": str(fm.device), **contamination(got.pairs, got.images, fm.ckpt),
               **report, "time_s": {**scored["seconds"], "total": time.perf_counter() - start}}
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


def identification_people(args, fm):
    """The pairs file's people (with --fold, that fold's: their <person> folders) and all
    their images in the one folder those person folders are in; every input problem as
    EvalError."""
    path = choose_pairs(args.pairs, fm)
    data, data_source = choose_data(args.data, path, fm)
    pairs, images = pr.read_pairs(path, data)
    if images:
        raise EvalError(f"{path}: the images of a .bin name no people, so nobody can be "
                        "enrolled; --identify needs an LFW pairs file or a CSV of "
                        "<person>/<image> paths")
    if args.fold is not None:
        folds, protocol = pair_folds(pairs, path)
        check_fold(args.fold, folds, protocol, path)
        pairs = [p for p, k in zip(pairs, folds) if k == args.fold]
    roots = sorted({Path(p).parent.parent for pair in pairs for p in pair[:2]})
    if len(roots) > 1:
        raise EvalError(f"{path}: its images lie in {len(roots)} folders ({roots[0]}, "
                        f"{roots[1]}, ...); --identify needs every person's folder in one "
                        "<person>/<image> folder")
    people_dir = roots[0]
    found, names = ds.read_identities(people_dir), pr.people_of(pairs)
    missing = sorted(names - set(found))
    if missing and not args.skip_missing:
        more = f" and {len(missing) - N_MISSING} more" if len(missing) > N_MISSING else ""
        raise EvalError(f"{len(missing)} people of {path} have no images in {people_dir}: "
                        f"{', '.join(missing[:N_MISSING])}{more}; crop them with `python "
                        "crop_dataset_to_faces.py`, pass the right --data, or --skip-missing "
                        "to leave them out")
    people = {n: found[n] for n in sorted(names) if n in found}
    gallery, probes = identification_sets(people)
    if not gallery:
        raise EvalError(f"{path}: none of its people has two images in {people_dir}, so "
                        "nobody can be enrolled; use a pairs file with matched pairs")
    return SimpleNamespace(path=path, pairs=pairs, gallery=gallery, probes=probes,
                           data=people_dir, data_source=data_source, missing=missing,
                           people=people)


def embed_paths(fm, paths, args):
    """Embeddings of image files, each decoded and embedded once, as score_pairs does
    (dataset.decode_all, then FaceModel.embed in the checkpoint's precision). Returns
    (embeddings, seconds {decode, embed})."""
    t0 = time.perf_counter()
    images = ds.decode_all(paths, fm.image_size)
    t1 = time.perf_counter()
    emb = fm.embed(images, args.flip, args.batch_size)
    return emb, {"decode": t1 - t0, "embed": time.perf_counter() - t1}


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
    write_table(path, ["probe", "person", "enrolled", "best_match", "best_score"],
                ([Path(p).name, name, int(name in labels), labels[i], f"{s:.6g}"]
                 for (name, p), i, s in zip(probes, scores.argmax(1), scores.max(1))))


def print_identification(r):
    lines = [f"checkpoint  {r['checkpoint']} ({r['model']}/{r['loss']}/{r['distance']}, "
             f"epoch {r['epoch']})",
             f"people      {r['pairs']}: {r['n_gallery']} enrolled (first photo each), "
             f"{r['n_mated_probes']} mated probes, {r['n_nonmated_probes']} non-mated probes "
             f"(people with one photo); data {r['data']}",
             f"closed set  rank-1 {r['rank1']:.4f}, rank-5 {r['rank5']:.4f}"]
    dirs = [f"{r[k]:.4f} at FAR {k.split('=')[1]}" for k in ("dir@far=0.01", "dir@far=0.1")
            if r[k] is not None]
    lines.append(f"open set    DIR {', '.join(dirs)} (BLUFR: thresholds fitted on these "
                 "non-mated probes)" if dirs else
                 "open set    no non-mated probes (nobody with one photo): DIR not measured")
    for name, v in r.get("at_validation_thresholds", {}).items():
        if v["dir"] is not None and v["false_alarm_rate"] is not None:
            lines.append(f"            DIR {v['dir']:.4f} with false alarms {v['false_alarm_rate']:.4f}"
                         f" at the checkpoint's {name} threshold {v['threshold']:.4f}")
    print("\n".join(lines))
    if r["contaminated"]:
        print(f"WARNING: {r['people_seen_in_training']} of {r['people_in_pairs']} people in "
              f"{Path(r['pairs']).name} were seen in training: this result is contaminated")


def validation_open_set(fm, scores, probe_labels, labels):
    """{name: {threshold, dir, false_alarm_rate}} at the checkpoint's own thresholds (the
    accuracy-optimal one and those by pair FAR, fitted on its validation people): what
    identify.py answers with. The dir@far figures are BLUFR's instead, their thresholds fitted
    on this test's non-mated probes."""
    ops = fm.ckpt.get("operating_points") or {}
    named = {"accuracy": fm.threshold, **{f"far={k}": p["threshold"]
                                          for k, p in (ops.get("points") or {}).items()}}
    out = {}
    for name, t in named.items():
        hit, alarm = metrics.open_set_at(scores, probe_labels, labels, t)
        out[name] = {"threshold": t, "dir": hit, "false_alarm_rate": alarm}
    return out


def evaluate_identification(args):
    """evaluate.py --identify: embed every image of the people once, score every probe
    against the gallery and write results.json, probes.csv and cmc.png."""
    start = time.perf_counter()
    fm = open_model(args)
    cfg = fm.ckpt["model_config"]
    got = identification_people(args, fm)
    paths = [p for _, p in got.gallery + got.probes]
    print(f"{len(got.people)} people of {got.path}: embedding their {len(paths)} images "
          f"from {got.data} ({got.data_source})")
    emb, seconds = embed_paths(fm, paths, args)
    t0 = time.perf_counter()
    n = len(got.gallery)
    scores = fm.score_matrix(emb[n:], fm.prepare_gallery(emb[:n])).numpy()
    labels = [name for name, _ in got.gallery]
    probe_labels = [name for name, _ in got.probes]
    report = metrics.identification_summary(scores, probe_labels, labels)
    report["at_validation_thresholds"] = validation_open_set(fm, scores, probe_labels, labels)
    seconds["score"] = time.perf_counter() - t0
    out = out_folder(args, fm, got.path, "identify-")
    out.mkdir(parents=True, exist_ok=True)
    write_probes(got.probes, labels, scores, out / "probes.csv")
    plot_cmc(report["cmc"], f"{cfg['model']}/{cfg.get('loss')}", out / "cmc.png")
    results = {**model_fields(fm), "pairs": str(got.path), "fold": args.fold,
               "data": str(got.data), "data_source": got.data_source, "flip": args.flip,
               "images": len(paths), "people_missing": len(got.missing),
               "device": str(fm.device),
               "protocol": "closed set: first photo by name enrolled, the others probes; open "
                           "set: people with one photo as non-mated probes; BLUFR DIR at rank 1, "
                           "its thresholds fitted on these non-mated probes (open_set_"
                           "thresholds); at_validation_thresholds: the checkpoint's own",
               **contamination(got.pairs, None, fm.ckpt), **report,
               "time_s": {**seconds, "total": time.perf_counter() - start}}
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    print_identification(results)
    print(f"wrote results.json, probes.csv and cmc.png to {out}")
    return 0


# ------------------------------------------------------------------ all pairs (--all-pairs)

def all_pairs_sets(args, got):
    """[(name, people)] of --all-pairs: one set per fold of a file with folds (their people
    are disjoint in View 2), else the file's people as one set."""
    folds, protocol = pair_folds(got.pairs, got.path)
    if args.fold is not None or protocol == ONE_SET:
        return [("all" if args.fold is None else f"fold {args.fold}", got.people)]
    sets = []
    for k in np.unique(folds):
        names = pr.people_of([p for p, f in zip(got.pairs, folds) if f == k])
        sets.append((f"fold {k}", {n: got.people[n] for n in sorted(names) if n in got.people}))
    return sets


def plot_far_roc(curves, path):
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (far, tar) in curves:
        ax.plot(far, tar, label=name, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1e-1)
    ax.set_xlabel("false-accept rate (every different-person pair)")
    ax.set_ylabel("true-accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_all_pairs(args):
    """evaluate.py --all-pairs: embed every image of the people once, then for each set every
    pair among its images, judged at the checkpoint's validation thresholds."""
    start = time.perf_counter()
    fm = open_model(args)
    got = identification_people(args, fm)
    ops = fm.ckpt.get("operating_points")
    if not ops:
        print(f"note: {fm.path} has no validation thresholds by FAR (`python calibrate.py "
              f"{fm.path}` adds them); only the test-fitted TAR is reported")
    sets = all_pairs_sets(args, got)
    paths = [p for _, people in sets for n in sorted(people) for p in people[n]]
    print(f"{len(paths)} images of {sum(len(p) for _, p in sets)} people of {got.path}, "
          f"{len(sets)} set(s): embedding from {got.data} ({got.data_source})")
    emb, seconds = embed_paths(fm, paths, args)
    t0, reports, curves, i = time.perf_counter(), [], [], 0
    for name, people in sets:
        n = sum(len(v) for v in people.values())
        e, ids = emb[i:i + n], [Path(p).parent.name for p in paths[i:i + n]]
        i += n
        pairs = op.embedding_pairs(fm.score_matrix, fm.prepare_gallery(e), e, ids,
                                   op.thresholds_of(ops))
        reports.append({"set": name, "n_images": n, "n_people": len(people),
                        **op.judged(pairs, ops)})
        curves.append((f"{name}: {n} images", op.roc(pairs)))
    seconds["score"] = time.perf_counter() - t0
    out = out_folder(args, fm, got.path, "all-pairs-")
    out.mkdir(parents=True, exist_ok=True)
    plot_far_roc(curves, out / "roc.png")
    results = {**model_fields(fm), "pairs": str(got.path), "fold": args.fold,
               "data": str(got.data), "flip": args.flip, "images": len(paths),
               "protocol": "every pair among the images of the file's people, per fold "
                           "(BLUFR); thresholds from the checkpoint's validation people",
               "validation": {k: v for k, v in (ops or {}).items()},
               **contamination(got.pairs, None, fm.ckpt), "sets": reports,
               "summary": op.across(reports), "exact_for_far_up_to": op.KEEP,
               "time_s": {**seconds, "total": time.perf_counter() - start}}
    write_atomic(out / "results.json", json.dumps(results, indent=2))
    print_all_pairs(results)
    print(f"wrote results.json and roc.png to {out}")
    return 0


def print_all_pairs(r):
    for s in r["sets"]:
        print(f"{s['set']:<8} {s['n_images']} images of {s['n_people']} people: "
              f"{s['n_same']:,} same-person and {s['n_different']:,} different-person pairs")
        for key, fitted in s["at_test_thresholds"].items():
            v = s["at_validation_thresholds"].get(key)
            held = f"TAR {v['tar']:.2%} at the validation threshold {v['threshold']:.4f} " \
                f"(its FAR here {v['far']:.2g}, {v['false_accepts']:,} false accepts); " \
                if v else ""
            print(f"  FAR {key:<6} {held}TAR {fitted['tar']:.2%} at the test's own threshold")
    if len(r["sets"]) > 1:
        for key, v in r["summary"].items():
            print(f"mean over {v['n_sets']} sets, {key}: TAR {v['mean']:.2%} ± {v['std']:.2%}")
    if r["contaminated"]:
        print(f"WARNING: {r['people_seen_in_training']} of {r['people_in_pairs']} people were "
              "seen in training: this result is contaminated")


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
        check_out(args.out)
        if args.compare:
            return compare(*args.compare, out=args.out)
        return evaluate(args)
    except (EvalError, DeviceError, ds.ProtocolError, m.CheckpointError,
            metrics.ScoresError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # mostly an output folder that cannot be made or written
        print(f"error: {e.filename or 'a file'}: {e.strerror or e}; check the path and its "
              "permissions, or pass another --out", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
