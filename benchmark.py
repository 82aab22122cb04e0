"""Reproduce the results table: accuracy on the official LFW protocol under a fixed CPU
training budget, and how fast each step runs.

    python benchmark.py [--protocol view1|view2|all] [--minutes 30] [--recipes seed,best,pretrained]
        [--out results] [--data-root dataset] [--lfw ARCHIVE_DIR] [--tables-only]

It reads LFW from --data-root (default dataset/, as `make data` / download_data.py leave it:
images/ and the protocol files); only with --lfw does it first extract the archive and the
protocol files of that folder into --data-root. It only runs the project's own scripts
(download_data.py, crop_dataset_to_faces.py, benchmark.py --profile, trainer.py for the
`seed` recipe, trainer2.py for `best`, trainer_pretrained.py for `pretrained`, evaluate.py,
ensemble.py for a recipe with members),
each as a subprocess, and collects what they write (experiments.py, where each recipe is its
trainer's defaults). Every finished step is remembered in OUT/cache/state.json, so a crashed benchmark picks up where it
stopped; crops are resumable anyway. Writes
OUT/benchmark.json, OUT/benchmark.md (also copied into the marked sections of README.md and
RECIPE.md), OUT/accuracy_vs_minutes.png, OUT/roc_view1.png. Every ± is the standard error of
the mean over the 10 folds, as the LFW results page reports it.
"""
import argparse
import csv
import json
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiments import (RECIPES, add_step_arguments, check_dataset, claim_run_dir, cpu_model,
                         eval_cmd, json_kind, peak_rss_mb, read_input_json, read_json,
                         read_state, run_step, train_cmd, train_speed, trainer_namespace,
                         write_docs)
from runtime import git_commit, write_atomic

SNAPSHOT_SHARES = (1 / 6, 1 / 3, 2 / 3)  # 5, 10 and 20 minutes of a 30-minute budget
# What --profile times, per recipe: paths (overrides on the recipe) profiled alternately in one
# run, so that drift on a shared machine hits them alike; the ratio is the last path's images/s
# against the first's. A recipe not listed is profiled as it is, for its FLOP/s.
PROFILES = {
    # The same network and maths: per-image augmentation and eager against trainer2.py's defaults.
    "best": {"old": ["--batch_augment=False", "--torch_compile=False"], "new": []},
    # The first try (issue 23's probe): trainer2.py's defaults with EfficientNet-Lite0 in them;
    # then trainer_pretrained.py's with one of its speed settings undone each; then its own.
    "pretrained": {"probe": ["--channels_last=False", "--mixed_precision=True",
                             "--torch_compile=True", "--freeze_stages=0"],
                   "nothing frozen": ["--freeze_stages=0"], "NCHW": ["--channels_last=False"],
                   "bf16": ["--mixed_precision=True"], "compiled": ["--torch_compile=True"],
                   "recipe": []},
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lfw", default=None,
                   help="folder with an LFW archive (*.tgz or *.zip) and the protocol files, to "
                        "extract into --data-root first (default: use --data-root as it is)")
    p.add_argument("--protocol", choices=["view1", "view2", "all"], default="all")
    p.add_argument("--minutes", type=float, default=30,
                   help="View 1 training budget per recipe; each View 2 fold trains for a "
                        "share of it (seed 10%%, best a third: 3 and 10 minutes of 30; "
                        "pretrained: View 1 only)")
    p.add_argument("--recipes", default="seed,best,pretrained", help=f"any of {', '.join(RECIPES)}")
    p.add_argument("--out", default="results")
    add_step_arguments(p, "README.md and RECIPE.md")
    p.add_argument("--profile", action="store_true",
                   help="time the parts of each --recipes training step (DataLoader, "
                        "augmentation, forward, backward, optimizer, validation) by the paths of "
                        "PROFILES, count its FLOPs against this machine's matmul peak, and time "
                        "embedding; writes OUT/profile.json, trains nothing")
    p.add_argument("--profile-steps", type=int, default=20, help="steps timed per path and round")
    p.add_argument("--profile-rounds", type=int, default=3,
                   help="alternated rounds of a recipe's paths, the median one reported")
    p.add_argument("--tables-only", action="store_true",
                   help="run nothing: rewrite OUT/benchmark.md and the docs' tables from "
                        "OUT/benchmark.json")
    return p.parse_args(argv)


# ------------------------------------------------------------------ running steps

IDENTIFY_KEYS = ("rank1", "rank5", "dir@far=0.01", "dir@far=0.1", "n_gallery", "n_mated_probes",
                 "n_nonmated_probes")


def identification(args, recipe, ckpt, out, name, state, state_path, cache, fold=None):
    """evaluate.py --identify on the test people of the pairs file (or of one View 2 fold)."""
    pairs = Path(args.data_root) / ("pairsDevTest.txt" if fold is None else "pairs.txt")
    run_step(name, eval_cmd(args, recipe, ckpt, pairs, out, fold) + ["--identify"], state,
             state_path, cache)
    r = read_json(out / "results.json")
    return {k: r[k] for k in IDENTIFY_KEYS}


def all_pairs(args, ckpt, pairs, out, name, state, state_path, cache):
    """evaluate.py --all-pairs on the test people: TAR at the checkpoint's validation FAR
    thresholds and at the test's own. Without --flip, whatever the recipe's evaluation: the
    thresholds were fitted on unflipped validation embeddings."""
    run_step(name, ["evaluate.py", ckpt, "--data", args.crops, "--pairs", pairs, "--out", out,
                    "--all-pairs"], state, state_path, cache)
    r = read_json(out / "results.json")["sets"][0]
    return {"n_images": r["n_images"], "n_people": r["n_people"], "n_same": r["n_same"],
            "n_different": r["n_different"],
            "validation": {k: {"tar": v["tar"], "far": v["far"]}
                           for k, v in r["at_validation_thresholds"].items()},
            "test": {k: v["tar"] for k, v in r["at_test_thresholds"].items()}}


# ------------------------------------------------------------------ protocols

def bench_dir(args, recipe, fold=None):
    """Where the benchmark trains RECIPE: for View 1, or for one View 2 fold."""
    return Path(args.logs) / (f"bench-view1-{recipe}" if fold is None else
                              f"bench-view2-{recipe}-fold{fold}")


def train(args, recipe, fold, minutes, extra, name, state, state_path, cache, snapshots=()):
    """Train RECIPE for MINUTES into its bench_dir's best_accuracy.pt: one run, or for a recipe
    with members, that many runs of an equal share of MINUTES (--member_seed 0, 1, ...: one
    people split) that ensemble.py combines. A recipe with a teacher learns from that recipe's
    model of the same protocol and fold. Returns the run folder whose config.json and
    metrics.csv describe the training, and {minutes: checkpoint} along the budget: the run's
    snapshots, or the first j members' ensemble after j shares."""
    run_dir, k = bench_dir(args, recipe, fold), RECIPES[recipe].get("members", 1)
    if RECIPES[recipe].get("teacher"):
        teacher = bench_dir(args, RECIPES[recipe]["teacher"], fold) / "best_accuracy.pt"
        if not teacher.is_file():
            raise SystemExit(f"error: {teacher}: recipe {recipe} learns from recipe "
                             f"{RECIPES[recipe]['teacher']}'s model, which is not there; list "
                             f"{RECIPES[recipe]['teacher']} before {recipe} in --recipes")
        extra = [*extra, f"--teacher={teacher.resolve()}"]
    if k == 1:
        if name not in state:
            claim_run_dir(run_dir, args.out)
        run_step(name, train_cmd(args, recipe, run_dir, minutes, extra, snapshots), state,
                 state_path, cache)
        found = {minutes * s: run_dir / f"snapshot_{minutes * s:g}min.pt" for s in snapshots}
        return run_dir, {**found, minutes: run_dir / "best_accuracy.pt"}
    members = [run_dir.with_name(f"{run_dir.name}-m{i}") for i in range(k)]
    curve = {}
    for i, member in enumerate(members):
        if f"{name}-m{i}" not in state:
            claim_run_dir(member, args.out)
        run_step(f"{name}-m{i}", train_cmd(args, recipe, member, minutes / k,
                                           [*extra, f"--member_seed={i}"]), state, state_path,
                 cache)
        if i == 0:  # the first member alone, then the members so far: the budget's curve
            curve[minutes / k] = member / "best_accuracy.pt"
            continue
        part = f"-{i + 1}of{k}"
        combined, step = ((run_dir, name) if i == k - 1 else
                          (run_dir.with_name(run_dir.name + part), name + part))
        if step not in state:
            claim_run_dir(combined, args.out)
        run_step(step, ["ensemble.py", *members[:i + 1], "--out", combined, "--data", args.crops,
                        "--protocol-dir", args.data_root], state, state_path, cache)
        curve[minutes * (i + 1) / k] = combined / "best_accuracy.pt"
    return members[0], curve


def view1(args, recipe, state, state_path, cache, bar):
    """Train on DevTrain people for the budget, evaluate best_accuracy.pt and the snapshots on
    pairsDevTest.txt."""
    run_dir = bench_dir(args, recipe)
    name = f"view1-{recipe}-train"
    trained, checkpoints = train(args, recipe, None, args.minutes, ["--split=view1"], name,
                                 state, state_path, cache, SNAPSHOT_SHARES)
    bar.update()
    if not (run_dir / "best_accuracy.pt").exists():
        raise SystemExit(f"error: {run_dir}: training wrote no best_accuracy.pt; see "
                         f"{cache / (name + '.log')}")
    pairs = Path(args.data_root) / "pairsDevTest.txt"
    curve = []
    for minutes, ckpt in sorted(checkpoints.items()):
        if not ckpt.exists():  # the run stopped early (patience) before this snapshot
            continue
        out = cache / f"view1-{recipe}-{minutes:g}min"
        run_step(f"view1-{recipe}-eval-{minutes:g}min",
                 eval_cmd(args, recipe, ckpt, pairs, out), state, state_path, cache)
        r = read_json(out / "results.json")
        curve.append({"minutes": minutes, "accuracy": r["kfold"]["mean"],
                      "stderr": r["kfold"]["stderr"]})
    bar.update()
    final = read_json(cache / f"view1-{recipe}-{args.minutes:g}min" / "results.json")
    out = cache / f"view2-timing-{recipe}"  # the View 2 pairs with a View 1 model: timing only
    run_step(f"view2-timing-{recipe}", eval_cmd(args, recipe, run_dir / "best_accuracy.pt",
                                                Path(args.data_root) / "pairs.txt", out),
             state, state_path, cache)
    timing = read_json(out / "results.json")
    run = read_json(trained / "config.json")
    ident = identification(args, recipe, run_dir / "best_accuracy.pt",
                           cache / f"view1-{recipe}-identify", f"view1-{recipe}-identify",
                           state, state_path, cache)
    far = all_pairs(args, run_dir / "best_accuracy.pt", pairs, cache / f"view1-{recipe}-all-pairs",
                    f"view1-{recipe}-all-pairs", state, state_path, cache)
    return {"identification": ident, "all_pairs": far,
            "train_people": run["train_people"], "val_people": run["val_people"],
            "train_threads": run["threads"], "view2_eval_images": timing["images"],
            "view2_eval_pairs": timing["n_pairs"],
            "accuracy": final["kfold"]["mean"], "std": final["kfold"]["std"],
            "stderr": final["kfold"]["stderr"], "auc": final["auc"], "eer": final["eer"],
            "tar@far=1e-2": final["tar@far=1e-2"], "tar@far=1e-3": final["tar@far=1e-3"],
            "contaminated": final["contaminated"],
            "people_seen_in_training": final["people_seen_in_training"],
            "epoch": final["epoch"], "curve": curve,
            "scores_csv": str(cache / f"view1-{recipe}-{args.minutes:g}min" / "scores.csv"),
            "train_images_per_s": train_speed(trained),
            "embed_images_per_s": final["images"] / final["time_s"]["embed"],
            "view2_eval_seconds": timing["time_s"]["total"]}


def fold_minutes(args, recipe):
    return args.minutes * RECIPES[recipe]["fold_share"]


def view2(args, recipe, state, state_path, cache, bar):
    """For each people.txt fold: train on the other nine for the recipe's share of the
    budget, choose the threshold on the other folds' pairs, test on the fold's 600 pairs."""
    folds = []
    for k in range(10):
        run_dir = bench_dir(args, recipe, k)
        train(args, recipe, k, fold_minutes(args, recipe), ["--split=view2", f"--fold={k}"],
              f"view2-{recipe}-fold{k}-train", state, state_path, cache)
        out = cache / f"view2-{recipe}-fold{k}"
        run_step(f"view2-{recipe}-fold{k}-eval",
                 eval_cmd(args, recipe, run_dir / "best_accuracy.pt",
                          Path(args.data_root) / "pairs.txt", out, fold=k),
                 state, state_path, cache)
        r = read_json(out / "results.json")
        ident = identification(args, recipe, run_dir / "best_accuracy.pt", out.with_name(
            out.name + "-identify"), f"view2-{recipe}-fold{k}-identify", state, state_path,
            cache, fold=k)
        folds.append({"fold": k, "accuracy": r["test_fold"]["accuracy"],
                      "threshold": r["test_fold"]["threshold"], "auc": r["auc"],
                      "people_seen_in_training": r["people_seen_in_training"],
                      "identification": ident})
        bar.update()
    acc = np.array([f["accuracy"] for f in folds])
    rank1 = np.array([f["identification"]["rank1"] for f in folds])
    return {"fold_minutes": fold_minutes(args, recipe),
            "accuracy": float(acc.mean()), "std": float(acc.std(ddof=1)),
            "stderr": float(acc.std(ddof=1) / np.sqrt(len(acc))), "folds": folds,
            "overlap": sum(f["people_seen_in_training"] for f in folds),
            "rank1": float(rank1.mean()), "rank1_stderr": float(rank1.std(ddof=1) / np.sqrt(10))}


# ------------------------------------------------------------------ reporting

# Every ± in the tables: the standard error of the mean over the 10 folds (std / sqrt(10)), the
# convention of the LFW results page.
PM = "mean ± standard error over the 10 folds"


def table(results):
    """The markdown tables: no hand-typed numbers anywhere."""
    b = results
    threads = sorted({r["train_threads"] for r in b["view1"].values()}) or [b["machine"]["threads"]]
    commits = ", ".join(f"`{c[:10]}`" for c in b["step_commits"])
    lines = [f"Budget: {b['minutes']:g} minutes of training per recipe on "
             f"{'/'.join(map(str, threads))} CPU threads ({b['machine']['cpu']}), from scratch, "
             f"LFW only. Numbers made by `{b['command']}` at "
             f"commit{'s' if len(b['step_commits']) > 1 else ''} {commits}; `make bench` reruns "
             "the benchmark on the `dataset/` that `make data` made.", ""]
    if b["view1"]:
        lines += view1_table(b)
    if b["view2"]:
        lines += view2_table(b)
    lines += all_pairs_table(b) + identification_table(b) + speed_table(b)
    return "\n".join(lines) + "\n"


def view1_table(b):
    r0 = next(iter(b["view1"].values()))
    lines = [f"**View 1**: trained on {r0['train_people']:,} people of `peopleDevTrain.txt` "
             f"(the other {r0['val_people']:,} give the validation pairs), tested on the "
             "pairs of `pairsDevTest.txt` (no test person seen in training); 10-fold threshold "
             f"cross-validation, {PM}.", "",
             "| recipe | accuracy | AUC | EER | TAR@FAR=1e-2 | TAR@FAR=1e-3 | "
             + " | ".join(f"acc. @ {m:g} min" for m in b["curve_minutes"]) + " |",
             "| --- " * (6 + len(b["curve_minutes"])) + "|"]
    for name, r in b["view1"].items():
        at = {round(c["minutes"], 6): c["accuracy"] for c in r["curve"]}
        lines.append(
            f"| {name} | {r['accuracy']:.2%} ± {r['stderr']:.2%} | {r['auc']:.4f} | "
            f"{r['eer']:.2%} | {r['tar@far=1e-2']:.2%} | {r['tar@far=1e-3']:.2%} | "
            + " | ".join(f"{at[round(m, 6)]:.2%}" if round(m, 6) in at else "n/a"
                         for m in b["curve_minutes"])
            + " |")
    return lines + [""]


def view2_table(b):
    lines = ["**View 2**: the official protocol, a model per `people.txt` fold trained on the "
             f"other nine for the minutes below (`best` gets more than `seed`); {PM}.", "",
             "| recipe | training minutes per fold | accuracy | lowest fold | overlap of "
             "training and test people |", "| --- | --- | --- | --- | --- |"]
    for name, r in b["view2"].items():
        minutes = r.get("fold_minutes", b["minutes"] / 10)  # a benchmark.json from before
        lowest = min(f["accuracy"] for f in r["folds"])
        lines.append(f"| {name} | {minutes:g} | {r['accuracy']:.2%} ± {r['stderr']:.2%} | "
                     f"{lowest:.2%} | {r['overlap']} |")
    return lines + [""]


def all_pairs_table(b):
    """TAR at low FAR from every pair of the DevTest people's images (evaluate.py
    --all-pairs); absent from a benchmark.json made before it was measured."""
    rows = [(name, r["all_pairs"]) for name, r in b["view1"].items() if "all_pairs" in r]
    if not rows:
        return []
    a = rows[0][1]
    lines = [f"**Low false-accept rates** (View 1 DevTest, every pair of the {a['n_images']:,} "
             f"images of its {a['n_people']:,} people: {a['n_same']:,} same-person and "
             f"{a['n_different']:,} different-person pairs; no flip). TAR at the threshold "
             "fitted on the validation people for each FAR, with the FAR it really gives on "
             "the test pairs, then BLUFR's TAR at a threshold fitted on the test pairs "
             "themselves:", "",
             "| recipe | TAR@1e-2 (test FAR) | TAR@1e-3 (test FAR) | TAR@1e-4 (test FAR) | "
             "BLUFR TAR@1e-3 | BLUFR TAR@1e-4 |", "| --- " * 6 + "|"]
    for name, a in rows:
        held = [a["validation"].get(k) for k in ("0.01", "0.001", "0.0001")]
        cells = [f"{percent(v['tar'])} ({v['far']:.2g})" if v else "n/a" for v in held]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {percent(a['test'].get('0.001'))}"
                     f" | {percent(a['test'].get('0.0001'))} |")
    return lines + [""]


def percent(value):
    return "n/a" if value is None else f"{value:.2%}"


def identification_table(b):
    """1:N identification on people never seen in training (evaluate.py --identify); absent
    from a benchmark.json made before it was measured."""
    rows = [(name, r["identification"]) for name, r in b["view1"].items()
            if "identification" in r]
    if not rows:
        return []
    lines = ["**Identification** (View 1 DevTest people; each person with two or more photos "
             "enrols one, the rest are probes; people with one photo are probes not in the "
             "gallery):", "", "| recipe | rank-1 | rank-5 | DIR at FAR 1% | DIR at FAR 10% | "
             "View 2 rank-1 (" + PM + ") |", "| --- " * 6 + "|"]
    for name, i in rows:
        v2 = b["view2"].get(name, {})
        fold_rank1 = f"{v2['rank1']:.2%} ± {v2['rank1_stderr']:.2%}" if "rank1" in v2 else "n/a"
        lines.append(f"| {name} | {percent(i['rank1'])} | {percent(i['rank5'])} | "
                     f"{percent(i['dir@far=0.01'])} | {percent(i['dir@far=0.1'])} | {fold_rank1} |")
    return lines + [""]


def speed_table(b):
    s, p = b["speed"], b.get("profile")
    profiled = (p or {}).get("recipes", {})
    lines = ["**Speed** on this machine:", "",
             "| step | figure |", "| --- | --- |",
             f"| crop (MTCNN, batched) | {s['crop_images_per_s']:.1f} images/s |"]
    for name, r in b["view1"].items():
        flip = " (each image and its mirror)" if "--flip" in RECIPES[name]["eval"] else ""
        use = ""
        if name in profiled:  # the run's own images/s at the profile's FLOPs per image
            gflops, share, dtype = utilisation(list(profiled[name]["paths"].values())[-1],
                                               p["peak"], r["train_images_per_s"])
            use = f", {gflops:.0f} GFLOP/s ({share:.0%} of this machine's {dtype} matmul peak)"
        lines += [f"| train `{name}` | {r['train_images_per_s']:.0f} images/s{use} |",
                  f"| embed `{name}`{flip} | {r['embed_images_per_s']:.0f} images/s |",
                  f"| View 2 evaluation `{name}` ({r['view2_eval_images']:,} images, "
                  f"{r['view2_eval_pairs']:,} pairs) | "
                  f"{r['view2_eval_seconds']:.1f} s |"]
    lines.append(f"| peak memory (largest step) | {s['peak_rss_mb']:.0f} MB |")
    return lines + [""] + profile_lines(p)


def profile_lines(p):
    """Each recipe's training step by the paths of PROFILES, profiled side by side in this run."""
    if not p:
        return []
    if "recipes" not in p:  # an older benchmark.py's profile: its figures are not in this form
        return ["(The profile of this benchmark.json is an older benchmark.py's: run the "
                "profile step again for its table.)", ""]
    steps = next(iter(p["recipes"].values()))["paths"]
    return [f"**Training steps profiled** (`benchmark.py --profile`, {next(iter(steps.values()))['steps']} "
            "steps per path and round; paths: PROFILES in benchmark.py):", "",
            profile_table(p), ""]


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results["view1"].items():
        c = r["curve"]
        ax.errorbar([x["minutes"] for x in c], [x["accuracy"] for x in c],
                    yerr=[x["stderr"] for x in c], marker="o", capsize=3, label=name)
    ax.set_xlabel("training minutes"), ax.set_ylabel("View 1 DevTest accuracy")
    ax.set_title("accuracy vs training time (10-fold, ± standard error)"), ax.grid(alpha=0.3)
    ax.legend(), fig.tight_layout(), fig.savefig(out / "accuracy_vs_minutes.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, r in results["view1"].items():
        with open(r["scores_csv"], newline="") as f:
            rows = list(csv.DictReader(f))
        fpr, tpr, _ = roc_curve([int(x["same"]) for x in rows], [float(x["score"]) for x in rows])
        ax.plot(np.maximum(fpr, 1e-3), tpr, label=f"{name} (AUC {r['auc']:.3f})")
    ax.set_xscale("log"), ax.set_xlim(1e-3, 1), ax.grid(alpha=0.3, which="both")
    ax.set_xlabel("false accept rate (log)"), ax.set_ylabel("true accept rate")
    ax.set_title("View 1 DevTest ROC"), ax.legend(), fig.tight_layout()
    fig.savefig(out / "roc_view1.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ main

def check_recipes(args):
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise SystemExit(f"error: unknown recipe {', '.join(sorted(unknown))}; use "
                         f"{', '.join(RECIPES)}")
    return recipes


def lfw_archive(folder):
    """The LFW archive in the folder given with --lfw."""
    folder = Path(folder)
    archives = sorted(folder.glob("*.tgz")) + sorted(folder.glob("*.zip")) if folder.is_dir() else []
    if not archives:
        raise SystemExit(f"error: {folder}: no LFW archive (*.tgz or *.zip) there; pass --lfw "
                         "with the folder holding the archive and the protocol files")
    return archives[0]


def prepare_data(args, archive, protocols, state, state_path, cache):
    """Extract ARCHIVE (only when --lfw gave one) into --data-root, check it, crop the faces;
    returns the crop speed in images/s."""
    if archive is not None:
        run_step("download", ["download_data.py", "--archive", archive, "--protocol-dir",
                              args.lfw, "--root", args.data_root], state, state_path, cache)
    check_dataset(args.data_root, protocols)
    images = Path(args.data_root) / "images"
    with tqdm(total=1, desc="crop", unit="step") as bar:
        run_step("crop", ["crop_dataset_to_faces.py", "--src", images, "--dst", args.crops],
                 state, state_path, cache)
        bar.update()
    # Crop speed on a fixed sample, so that the figure does not depend on the crop cache.
    sample = cache / "crop_sample"
    shutil.rmtree(sample, ignore_errors=True)
    crop_log = run_step("crop-speed", ["crop_dataset_to_faces.py", "--src", images, "--dst",
                                       sample, "--limit", "320"], state, state_path, cache)["log"]
    return float(re.search(r"\(([\d.]+) images/s\)", Path(crop_log).read_text()).group(1))


def profile_step(args, recipes, state, state_path, cache):
    """benchmark.py --profile as a step of this run, so that the speed table's ratios and
    FLOP/s come from the same run as the accuracies."""
    out = cache / "profile"
    run_step("profile", ["benchmark.py", "--profile", "--out", out, "--data-root", args.data_root,
                         "--crops", args.crops, f"--train-args={args.train_args}",
                         "--recipes", ",".join(recipes), "--profile-steps", args.profile_steps,
                         "--profile-rounds", args.profile_rounds],
             state, state_path, cache)
    return read_json(out / "profile.json")


def run_protocols(args, recipes, protocols, state, state_path, cache):
    results = {"view1": {}, "view2": {}}
    for protocol in protocols:
        # A recipe without a fold_share is not run on View 2.
        these = recipes if protocol == "view1" else [
            r for r in recipes if RECIPES[r]["fold_share"] is not None]
        steps = 2 * len(these) if protocol == "view1" else 10 * len(these)
        run = view1 if protocol == "view1" else view2
        with tqdm(total=steps, desc=protocol, unit="step") as bar:
            for recipe in these:
                results[protocol][recipe] = run(args, recipe, state, state_path, cache, bar)
    return results


def describe(args, argv, recipes, protocols, state, commit):
    """What made the numbers: command, commits, budget, software and machine."""
    command = "python benchmark.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    return {
        "step_commits": sorted({s.get("commit", "unknown") for s in state.values()}),
        "command": command.strip(), "minutes": args.minutes, "recipes": recipes,
        "recipe_overrides": {r: RECIPES[r] for r in recipes}, "protocols": protocols,
        "curve_minutes": [args.minutes * s for s in (*SNAPSHOT_SHARES, 1.0)],
        "git_commit": commit, "torch": torch.__version__,
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
    }


def write_tables(results, out, docs):
    text = table(results)
    write_atomic(out / "benchmark.md", text)
    if docs:
        write_docs(docs, text)
    return text


def profile_recipes(args, recipes, rounds=3):
    """Each recipe's paths (PROFILES) in alternated rounds, the median round of each (one round
    for a recipe with one path); this machine's matmul peak at the same threads; embedding
    throughput of the first recipe."""
    import profiling
    out = {}
    for recipe in recipes:
        trainer = trainer_namespace(RECIPES[recipe]["trainer"])
        base = profile_base(args, recipe)
        paths = PROFILES.get(recipe, {"recipe": []})
        runs = {name: [] for name in paths}
        for _ in range(rounds if len(paths) > 1 else 1):
            for name, extra in paths.items():
                runs[name].append(profiling.profile(trainer, base + extra, steps=args.profile_steps))
        median = {name: sorted(r, key=lambda x: x["images_per_s"])[len(r) // 2]
                  for name, r in runs.items()}
        first, last = median[next(iter(paths))], median[list(paths)[-1]]
        out[recipe] = {"paths": {name: {"overrides": paths[name], **median[name]}
                                 for name in paths},
                       "ratio": last["images_per_s"] / first["images_per_s"] if len(paths) > 1
                       else None, "rounds": len(runs[list(paths)[-1]])}
    threads = last["threads"]
    embedding = profiling.profile_embedding(trainer_namespace(RECIPES[recipes[0]]["trainer"]),
                                            profile_base(args, recipes[0]))
    return {"recipes": out, "peak": profiling.machine_peak(threads), "embedding": embedding,
            "embedding_recipe": recipes[0]}


def profile_base(args, recipe):
    return [f"--data_dir={args.crops}", f"--protocol_dir={args.data_root}",
            *RECIPES[recipe]["train"], *args.train_args.split()]


def utilisation(path, peak, images_per_s=None):
    """(achieved GFLOP/s, its share of the matmul peak of the step's dtype) at IMAGES_PER_S
    (default: the profile's own)."""
    gflops = path["gflop_per_image"] * (images_per_s or path["images_per_s"])
    dtype = "bf16" if path["mixed_precision"] else "fp32"
    return gflops, gflops / peak["gflops_per_s"][dtype], dtype


def profile_table(p):
    """--profile's table: every recipe's paths, part by part, with FLOP/s against the peak."""
    peak = p["peak"]["gflops_per_s"]
    lines = [f"Matmul peak here ({p['peak']['n']}² at {p['peak']['threads']} threads): "
             f"{peak['bf16']:.0f} GFLOP/s bf16, {peak['fp32']:.0f} fp32.", ""]
    for recipe, r in p["recipes"].items():
        paths = r["paths"]
        lines += [f"| part of a `{recipe}` step | " + " | ".join(f"{k} (ms)" for k in paths) + " |",
                  "| --- " * (1 + len(paths)) + "|"]
        for part in next(iter(paths.values()))["ms_per_step"]:
            lines.append(f"| {part} | " + " | ".join(f"{x['ms_per_step'][part]:.1f}"
                                                     for x in paths.values()) + " |")
        rows = [("whole step", lambda x: f"{x['step_ms']:.1f}"),
                ("images/s", lambda x: f"{x['images_per_s']:.0f}"),
                ("GFLOP per image (forward and backward)", lambda x: f"{x['gflop_per_image']:.3f}"),
                ("achieved GFLOP/s (share of the dtype's peak)",
                 lambda x: "{:.0f} ({:.0%} of {})".format(*utilisation(x, p["peak"]))),
                ("validation (s, once)", lambda x: f"{x['validation_s']:.1f}")]
        lines += [f"| {name} | " + " | ".join(f(x) for x in paths.values()) + " |"
                  for name, f in rows]
        if r["ratio"]:
            lines.append(f"\nImages/s, {list(paths)[-1]} against {next(iter(paths))}: "
                         f"**{r['ratio']:.2f}x** (median of {r['rounds']} alternated rounds).")
        lines.append("")
    lines.append(f"Embedding (`{p['embedding_recipe']}`): " + ", ".join(
        f"{k} {v:.0f} images/s" for k, v in p["embedding"]["images_per_s"].items())
        + f" (compile took {p['embedding']['compile_s']:.0f} s).")
    return "\n".join(lines)


def results_problem(results):
    """What is wrong with a benchmark.json's outline for table(), or None."""
    if not isinstance(results, dict):
        return f"{json_kind(results)}, not an object"
    needs = [("view1", dict), ("view2", dict), ("speed", dict), ("machine", dict),
             ("step_commits", list), ("command", str), ("minutes", (int, float))]
    if results.get("view1"):
        needs.append(("curve_minutes", list))  # the View 1 table's columns
    for key, kind in needs:
        if not isinstance(results.get(key), kind) or isinstance(results.get(key), bool):
            return f"{json_kind(results.get(key)) if key in results else 'nothing'} as {key}"
    return None


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.profile:
        result = profile_recipes(args, check_recipes(args), args.profile_rounds)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "profile.json", json.dumps(result, indent=2))
        print(profile_table(result))
        return 0
    if args.tables_only:
        if not (out / "benchmark.json").is_file():
            raise SystemExit(f"error: {out}: no benchmark.json to make the tables from")
        results = read_input_json(out / "benchmark.json", results_problem,
                                  "the results of python benchmark.py",
                                  "run python benchmark.py again to rewrite it (finished "
                                  "steps are kept in its cache)")
        print(write_tables(results, out, args.docs))
        return 0
    recipes = check_recipes(args)
    protocols = ["view1", "view2"] if args.protocol == "all" else [args.protocol]
    # Check the inputs before writing anything.
    archive = None if args.lfw is None else lfw_archive(args.lfw)
    if archive is None:
        check_dataset(args.data_root, protocols)
    cache = out / "cache"
    state_path = cache / "state.json"
    state = read_state(state_path)  # checked before any run folder is claimed
    cache.mkdir(parents=True, exist_ok=True)
    started, commit = time.time(), git_commit()  # the code that produced the numbers

    crop_speed = prepare_data(args, archive, protocols, state, state_path, cache)
    profile = profile_step(args, recipes, state, state_path, cache)
    results = run_protocols(args, recipes, protocols, state, state_path, cache)
    results.update(describe(args, argv, recipes, protocols, state, commit))
    results.update({
        "profile": profile,
        "speed": {"crop_images_per_s": crop_speed,
                  # cached steps keep the figure of the run that made them
                  "peak_rss_mb": max([peak_rss_mb()] + [s.get("peak_rss_mb", 0)
                                                        for s in state.values()])},
        "wall_seconds_this_invocation": time.time() - started,
    })
    write_atomic(out / "benchmark.json", json.dumps(results, indent=2))
    if results["view1"]:
        plot(results, out)
    print(write_tables(results, out, args.docs))
    print(f"wrote {out}/benchmark.json, benchmark.md and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
