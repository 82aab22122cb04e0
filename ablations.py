"""The old project's "things I tried", rerun honestly: one row per claim, a verdict each.

    python ablations.py [--minutes 8] [--rows 1,7,11a] [--out results/ablations]
        [--data-root dataset] [--crops cropped_dataset] [--logs logs] [--tables-only]

Every run trains on the View 1 DevTrain people for the same budget (row 1 compares budgets),
keeps the checkpoint that was best on the validation pairs of held-out training people, and
is tested once on the 1,000 pairs of pairsDevTest.txt, whose people it never saw. Each row
compares two runs on those pairs: the accuracy difference with a paired bootstrap 95% interval
(the one `evaluate.py --compare` prints) and a verdict the interval decides:
- "holds" or "does not hold" when the interval lies on one side of 0;
- "inconclusive" when it straddles 0, which is never rounded to a win.
Each run is also scored on 1,000 pairs of its own training people, so that over- and
under-fitting show. Each run is a named set of overrides on a recipe of benchmark.py (the
defaults of its trainer file) or on another run. It uses benchmark.py's steps (trainer.py or
trainer2.py, and evaluate.py, as subprocesses) and resumes where it stopped. The ResNeXt rows
need ImageNet weights in the torch cache; without them they are listed as not run. Writes
OUT/ablations.json, OUT/ablations.md (also into RECIPE.md between the ablations markers) and
OUT/ablations.png.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

import dataset as ds
import metrics
from backbones import imagenet_weights_file
from experiments import (RECIPES, add_step_arguments, check_dataset, claim_run_dir, cpu_model,
                         eval_cmd, json_kind, metrics_rows, read_input_json, read_json,
                         read_state, run_step, train_cmd, train_speed, trainer_config,
                         write_docs)
from runtime import git_commit, is_number, write_atomic

MINUTES = 8  # per run: 15 runs fit one ~3-hour sitting on 2 CPU cores
LONG = 3.75  # 30 minutes at --minutes 8: the benchmark's budget
# The epochs each scratch run trained in its 30 minutes (the table's epochs column): what the
# pretrained run of the same people split trains for in row 17. Two sittings' machines differ
# by up to a fifth in speed, so each pair gets its own count.
SCRATCH_EPOCHS = {"scratch-30": 21, "scratch-30-seed1": 26}

# Every run: (what it changes: a recipe of benchmark.py or another run; the overrides it adds
# to that one's; budget in multiples of --minutes). {photos} is the uncropped LFW photos
# (DATA_ROOT/images).
RUNS = {
    "seed": ("seed", [], 1),
    "seed-long": ("seed", [], 3),
    "seed-wd1e-3": ("seed", ["--weight_decay=1e-3"], 1),
    "seed-dropout": ("seed", ["--p=0.5"], 1),
    "seed-lr1e-3": ("seed", ["--lr=1e-3"], 1),
    "seed-lr1e-5": ("seed", ["--lr=1e-5"], 1),
    "seed-small": ("seed", ["--width=32"], 1),   # Koch's net is 64-128-128-256, 4096 units
    "seed-big": ("seed", ["--width=96"], 1),
    "seed-photos": ("seed", ["--data_dir={photos}"], 1),
    "seed-residual": ("seed", ["--model=compact", "--image_size=112", "--init=kaiming"], 1),
    "seed-augment": ("seed", ["--augment_p=1.0", "--erase_p=0.5"], 1),
    "best": ("best", [], 1),
    "best-l1": ("best", ["--distance=l1"], 1),
    "best-bce": ("best", ["--loss=bce", "--distance=l1"], 1),
    "best-contrastive": ("best", ["--loss=contrastive"], 1),
    "best-triplet": ("best", ["--loss=triplet", "--triplet_margin=0.2"], 1),
    # From the ImageNet weights (the trainers' pretrained=True).
    "resnext": ("best", ["--model=resnext", "--lr=0.01"], 1),
    "resnext-head256": ("resnext", ["--head_hidden=256"], 1),
    "resnext-relu": ("resnext", ["--activation=relu"], 1),
    "resnext-no-layer4": ("resnext", ["--drop_layer4=True"], 1),
    "resnext-dropout": ("resnext", ["--p=0.8"], 1),
    # The same four claims on the ImageNet backbone that can be installed here: the pretrained
    # track (trainer_pretrained.py) with the old project's head (1,024 sigmoid units) and its
    # whole net (row 14e cuts the last stage, which the recipe now cuts by default).
    "effnet": ("pretrained", ["--mlp_depth=1", "--drop_last_stage=False"], 1),
    "effnet-head256": ("effnet", ["--head_hidden=256"], 1),
    "effnet-relu": ("effnet", ["--activation=relu"], 1),
    "effnet-no-last-stage": ("effnet", ["--drop_last_stage=True"], 1),
    "effnet-dropout": ("effnet", ["--p=0.8"], 1),
    # Does ImageNet pretraining help when LFW is the only face data? 30 minutes at --minutes 8,
    # each arm twice (seed 1 also draws other validation people and another data order).
    "pretrained-30": ("pretrained", [], LONG),
    "pretrained-30-seed1": ("pretrained-30", ["--seed=1"], LONG),
    "scratch-30": ("pretrained", ["--pretrained=False", "--freeze_stages=0"], LONG),
    "scratch-30-seed1": ("scratch-30", ["--seed=1"], LONG),
    # As many epochs as the scratch run gets in its 30 minutes (SCRATCH_EPOCHS), the schedule
    # counted in epochs, not minutes: the weights' value apart from the frozen stages' speed.
    "pretrained-epochs": ("pretrained", ["--max_minutes=0",
                                         f"--epochs={SCRATCH_EPOCHS['scratch-30']}"], 1),
    "pretrained-epochs-seed1": ("pretrained-epochs", [
        "--seed=1", f"--epochs={SCRATCH_EPOCHS['scratch-30-seed1']}"], 1),
    "best-30": ("best", [], LONG),
    "best-30-seed1": ("best-30", ["--seed=1"], LONG),
}

# Every row: (id, the old claim in substance, base run, variant run, what the claim expects of
# the variant's accuracy minus the base's: "better", "not better", "no effect", or None for a
# comparison that no claim made).
ROWS = [
    ("1", "More training (50 -> 500 epochs) does not help", "seed", "seed-long", "not better"),
    ("2", "Weight decay above 1e-4 does not converge", "seed", "seed-wd1e-3", "not better"),
    ("3", "Dropout only slows training and does not cure overfitting", "seed", "seed-dropout",
     "not better"),
    ("4a", "1e-4 is the sweet spot: a learning rate of 1e-3 is too much", "seed",
     "seed-lr1e-3", "not better"),
    ("4b", "1e-4 is the sweet spot: a learning rate of 1e-5 is too slow", "seed", "seed-lr1e-5",
     "not better"),
    ("5", "A smaller model stops overfitting but gets only about 70%", "seed", "seed-small",
     "not better"),
    ("6", "A bigger model trains better but still tests at about 80%", "seed", "seed-big",
     "not better"),
    ("7", "Cropped faces beat whole photos", "seed-photos", "seed", "better"),
    ("8", "A network with residual connections helps", "seed", "seed-residual", "better"),
    ("9", "More aggressive data augmentation helps", "seed", "seed-augment", "better"),
    ("10", "L1 distance is not useful in high dimensions: cosine beats it", "best-l1", "best",
     "better"),
    ("11a", "BCE is weaker than ArcFace", "best-bce", "best", "better"),
    ("11b", "BCE is weaker than triplet loss", "best-bce", "best-triplet", "better"),
    ("11c", "(no claim) contrastive loss against BCE, for the full comparison", "best-bce",
     "best-contrastive", None),
    ("12", "ResNeXt-50: the classifier head's size has no effect", "resnext", "resnext-head256",
     "no effect"),
    ("13", "ResNeXt-50: a sigmoid head beats a ReLU one", "resnext-relu", "resnext", "better"),
    ("14", "ResNeXt-50: removing layer 4 costs training accuracy, not test accuracy", "resnext",
     "resnext-no-layer4", "no effect"),
    ("15", "ResNeXt-50: 80% dropout raises test accuracy (82% -> 86%)", "resnext",
     "resnext-dropout", "better"),
    ("12e", "ResNeXt-50's row 12, on EfficientNet-Lite0 from ImageNet: the head's size has no "
     "effect", "effnet", "effnet-head256", "no effect"),
    ("13e", "ResNeXt-50's row 13, on EfficientNet-Lite0 from ImageNet: a sigmoid head beats a "
     "ReLU one", "effnet-relu", "effnet", "better"),
    ("14e", "ResNeXt-50's row 14, on EfficientNet-Lite0 from ImageNet: removing the last stage "
     "costs training accuracy, not test accuracy", "effnet", "effnet-no-last-stage", "no effect"),
    ("15e", "ResNeXt-50's row 15, on EfficientNet-Lite0 from ImageNet: 80% dropout raises test "
     "accuracy", "effnet", "effnet-dropout", "better"),
    ("16a", "Fine-tuning ImageNet weights beats training from scratch (the old project's "
     "premise; EfficientNet-Lite0, 30 minutes)", "scratch-30", "pretrained-30", "better"),
    ("16b", "The same, a second run of each (seed 1)", "scratch-30-seed1", "pretrained-30-seed1",
     "better"),
    ("17a", "The same at an equal number of epochs (the pretrained run's frozen stages make it "
     "faster)", "scratch-30", "pretrained-epochs", "better"),
    ("17b", "The same, a second run of each (seed 1)", "scratch-30-seed1",
     "pretrained-epochs-seed1", "better"),
    ("18a", "(no claim) the pretrained track against compact's `best`, 30 minutes each",
     "best-30", "pretrained-30", None),
    ("18b", "The same, a second run of each (seed 1)", "best-30-seed1", "pretrained-30-seed1",
     None),
]
TRAIN_PAIRS = 1000  # pairs of each run's own training people: its training accuracy
# The seed recipe's epoch (16,330 pairs, about 12 minutes) outlasts a run: 4,000-pair epochs
# give each run a few validation evaluations to choose its checkpoint from.
SEED_EPOCH = ["--pairs_per_epoch=4000"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=MINUTES, help="training budget per run")
    p.add_argument("--rows", default="", help="comma-separated row ids (default: every row)")
    p.add_argument("--out", default="results/ablations")
    add_step_arguments(p, "RECIPE.md")
    p.add_argument("--imagenet", action="store_true",
                   help="run the ResNeXt rows even when the ImageNet weights are not in the "
                        "torch cache (trainer2.py then downloads them)")
    p.add_argument("--tables-only", action="store_true",
                   help="run nothing: rewrite the table and the plot from OUT/ablations.json")
    return p.parse_args(argv)


def verdict(expect, low, high):
    """What the 95% interval of variant minus base says about the claim."""
    if expect is None:
        return "no claim"
    if low <= 0 <= high:
        return "inconclusive"
    if expect == "no effect":
        return "does not hold"
    return "holds" if (low > 0) == (expect == "better") else "does not hold"


def selected_rows(args):
    rows = [r for r in ROWS if not args.rows or r[0] in args.rows.split(",")]
    unknown = set(filter(None, args.rows.split(","))) - {r[0] for r in ROWS}
    if unknown:
        raise SystemExit(f"error: no row {', '.join(sorted(unknown))}; the rows are "
                         f"{', '.join(r[0] for r in ROWS)}")
    return rows


def resolve(run):
    """RUN's recipe and every override it makes on that recipe (its base run's first)."""
    base, overrides, _ = RUNS[run]
    if base in RECIPES:
        return base, list(overrides)
    recipe, inherited = resolve(base)
    return recipe, inherited + overrides


def needs_imagenet(run):
    """Whether RUN trains ResNeXt from its ImageNet weights (by its settings, not its text)."""
    recipe, overrides = resolve(run)
    cfg = trainer_config([RECIPES[recipe]["trainer"], *overrides])
    return cfg["model"] == "resnext" and cfg["pretrained"]


def run_folder(args, run):
    return Path(args.logs) / f"ablation-{run}"


def run_overrides(args, run):
    """RUN's recipe and its overrides on it, {photos} made DATA_ROOT/images."""
    recipe, overrides = resolve(run)
    photos = str(Path(args.data_root) / "images")
    return recipe, [o.replace("{photos}", photos) for o in overrides]


def train_command(args, run):
    """The trainer command that trains RUN: its recipe's on the View 1 split, then RUN's
    overrides, last, so that --data_dir={photos} wins over train_cmd's crops."""
    recipe, overrides = run_overrides(args, run)
    extra = ["--split=view1"] + (SEED_EPOCH if recipe == "seed" else [])
    return train_cmd(args, recipe, run_folder(args, run), args.minutes * RUNS[run][2],
                     extra) + overrides


def train_pairs_file(run_dir, data_dir, path):
    """TRAIN_PAIRS pairs of the people this run trained on (its config's split, validation
    people left out), in pairsDevTest.txt's format, so that evaluate.py scores them."""
    cfg = read_json(run_dir / "config.json")["config"]
    split = ds.make_split(data_dir, cfg["protocol_dir"], "view1", cfg["seed"],
                          cfg["val_fraction"], cfg["val_pairs"], slice_of_data=cfg["slice_of_data"])
    pairs = ds.sample_pairs(split["train"], TRAIN_PAIRS, seed=cfg["seed"] + 5)

    def key(p):
        name, number = Path(p).stem.rsplit("_", 1)
        return name, int(number)
    same = ["\t".join(map(str, (*key(a), key(b)[1]))) for a, b, y in pairs if y]
    diff = ["\t".join(map(str, (*key(a), *key(b)))) for a, b, y in pairs if not y]
    write_atomic(path, "\n".join([str(len(same)), *same, *diff]) + "\n")
    return path


def run_one(args, name, state, state_path, cache):
    """Train RUN, then score its selected checkpoint on DevTest and on its training people."""
    recipe, overrides = run_overrides(args, name)
    run_dir, cmd = run_folder(args, name), train_command(args, name)
    data = Path(trainer_config(cmd)["data_dir"])  # the images it trained on: crops or photos
    step = f"{name}-train"
    if step not in state:
        claim_run_dir(run_dir, args.out)
    run_step(step, cmd, state, state_path, cache)
    ckpt = run_dir / "best_accuracy.pt"
    test, train = cache / f"{name}-devtest", cache / f"{name}-train-pairs"
    run_step(f"{name}-eval", eval_cmd(args, recipe, ckpt, Path(args.data_root) / "pairsDevTest.txt",
                                      test, data=data), state, state_path, cache)
    pairs = train_pairs_file(run_dir, data, cache / f"{name}-train-pairs.txt")
    run_step(f"{name}-eval-train", eval_cmd(args, recipe, ckpt, pairs, train, data=data), state,
             state_path, cache)
    r, t = read_json(test / "results.json"), read_json(train / "results.json")
    rows = metrics_rows(run_dir)
    # The DevTest scores are kept beside the table (the cache is not): a later sitting compares
    # against this run without training it again (recorded_runs).
    kept = Path(args.out) / "scores" / name
    kept.mkdir(parents=True, exist_ok=True)
    write_atomic(kept / "scores.csv", (test / "scores.csv").read_text())
    return {"recipe": recipe, "overrides": overrides, "minutes": args.minutes * RUNS[name][2],
            "commit": state[step]["commit"],
            "accuracy": r["kfold"]["mean"], "stderr": r["kfold"]["stderr"], "auc": r["auc"],
            "contaminated": r["contaminated"], "train_accuracy": t["kfold"]["mean"],
            # best_accuracy.pt is the evaluation with the highest validation accuracy
            "val_accuracy": max(float(x["accuracy"]) for x in rows),
            "last_val_accuracy": float(rows[-1]["accuracy"]), "epochs": int(rows[-1]["epoch"]),
            "trained_minutes": float(rows[-1]["minutes"]),
            "images_per_s": train_speed(run_dir), "scores": str(kept)}


def compare_row(row, runs):
    """The row's verdict from its two runs' DevTest scores (variant minus base)."""
    rid, claim, base, variant, expect = row
    out = {"id": rid, "claim": claim, "base": base, "variant": variant, "expect": expect}
    if base not in runs or variant not in runs:
        return {**out, "verdict": "not run: needs ImageNet weights"}
    d = metrics.compare_scores(runs[base]["scores"], runs[variant]["scores"])
    return {**out, "difference": d["difference"], "low": d["low"], "high": d["high"],
            "n_pairs": d["n_pairs"], "verdict": verdict(expect, d["low"], d["high"])}


def run_rows(args, rows, state, state_path, cache):
    """Every run the rows need, once each (base runs are shared), then the comparisons."""
    wanted = list(dict.fromkeys(name for r in rows for name in r[2:4]))
    skip = not args.imagenet and not imagenet_weights_file().is_file()
    todo = [n for n in wanted if not (skip and needs_imagenet(n))]
    runs, recorded = {}, recorded_runs(args, state)
    with tqdm(total=len(todo), desc="ablation runs", unit="run") as bar:
        for name in todo:
            runs[name] = recorded.get(name) or run_one(args, name, state, state_path, cache)
            bar.update()
    return runs, [compare_row(r, runs) for r in rows]


def recorded_runs(args, state):
    """The runs of OUT/ablations.json that this cache has not trained, whose recipe, overrides
    and budget are still what RUNS says, and whose DevTest scores were kept: an earlier
    sitting's (its logs and cache may be gone), reused instead of trained again."""
    path = Path(args.out) / "ablations.json"
    if not path.is_file():
        return {}
    old = read_input_json(path, result_problem, "the results of python ablations.py",
                          "move it away to start a new table")
    out = {}
    for name, run in old["runs"].items():
        if name not in RUNS or f"{name}-train" in state:
            continue
        recipe, overrides = run_overrides(args, name)
        same = (run.get("recipe"), run.get("overrides"), run.get("minutes")) == \
            (recipe, overrides, args.minutes * RUNS[name][2])
        if same and (Path(str(run.get("scores"))) / "scores.csv").is_file():
            out[name] = run
    return out


def change(row):
    """What the variant changes, in trainer overrides relative to the base run."""
    (base_recipe, base), (recipe, variant) = resolve(row["base"]), resolve(row["variant"])
    if base_recipe != recipe:
        return f"{recipe} recipe"
    added = [o for o in variant if o not in base]
    removed = [o for o in base if o not in variant]
    parts = [f"`{o}`" for o in added] + [f"without `{o}`" for o in removed]
    # --max_minutes=0 trains for its epochs, whatever its budget multiple says
    if RUNS[row["base"]][2] != RUNS[row["variant"]][2] and "--max_minutes=0" not in variant:
        parts.insert(0, f"{RUNS[row['variant']][2]:g}x the budget")
    return ", ".join(parts) or "none"


def trained(run):
    """A run's epochs and minutes of training, as its metrics.csv ended (older results: '?')."""
    if "trained_minutes" not in run:
        return "?"
    return f"{run['epochs']} ({run['trained_minutes']:.0f})"


def pct(value):
    return "-" if value is None else f"{value:.1%}"


def sittings(result):
    """Which invocation made which rows: an older ablations.json made all of its rows in one."""
    return result.get("sittings") or [
        {key: result[key] for key in ("command", "git_commit", "machine", "minutes")}
        | {"rows": [r["id"] for r in result["rows"]]}]


def made_by(result):
    return "; ".join(f"rows {', '.join(s['rows'])} by `{s['command']}` at commit "
                     f"`{s['git_commit'][:10]}` on {s['machine']}, {s['minutes']:g} minutes of "
                     "training per run" for s in sittings(result))


def table(result):
    """The markdown table: no hand-typed numbers."""
    runs = result["runs"]
    lines = [f"Made by `ablations.py`: {made_by(result)}. Each run trains on the "
             "View 1 DevTrain people (rows 1 and 16-18: longer), the checkpoint chosen on validation "
             "pairs of held-out training people, tested on the 1,000 DevTest pairs. "
             "*difference*: the variant's DevTest accuracy minus the base's, with its paired "
             "bootstrap 95% interval; an interval that straddles 0 is inconclusive. "
             "*train / val*: accuracy on 1,000 pairs of the run's own training people and on "
             "the validation pairs, base → variant. *epochs (minutes)*: how long each trained.",
             "", "| row | claim | variant (against base) | DevTest accuracy, base → variant | "
             "AUC | train / val | epochs (minutes) | difference [95% interval] | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        b, v = runs.get(row["base"]), runs.get(row["variant"])
        what = f"{change(row)} (`{row['variant']}` against `{row['base']}`)"
        if b is None or v is None:
            lines.append(f"| {row['id']} | {row['claim']} | {what} | not run | | | | | "
                         f"**{row['verdict']}** |")
            continue
        lines.append(
            f"| {row['id']} | {row['claim']} | {what} | {pct(b['accuracy'])} → "
            f"{pct(v['accuracy'])} | {b['auc']:.3f} → {v['auc']:.3f} | "
            f"{pct(b['train_accuracy'])} / {pct(b['val_accuracy'])} → "
            f"{pct(v['train_accuracy'])} / {pct(v['val_accuracy'])} | "
            f"{trained(b)} → {trained(v)} | {row['difference']:+.1%} [{row['low']:+.1%}, {row['high']:+.1%}] | "
            f"**{row['verdict']}** |")
    return "\n".join(lines) + "\n"


def plot(result, path):
    """The differences and their intervals, one line per row that ran."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["rows"] if "difference" in r][::-1]
    colour = {"holds": "tab:green", "does not hold": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.2))
    for y, r in enumerate(rows):
        err = [[100 * (r["difference"] - r["low"])], [100 * (r["high"] - r["difference"])]]
        ax.errorbar(100 * r["difference"], y, xerr=err, capsize=3, fmt="o",
                    color=colour.get(r["verdict"], "tab:grey"))
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['id']}: {r['variant']} vs {r['base']}" for r in rows])
    ax.set_xlabel("variant minus base, DevTest accuracy points (95% interval)")
    ax.set_title("green: holds, red: does not hold, grey: inconclusive", fontsize=10)
    ax.grid(axis="x", alpha=0.3), fig.tight_layout(), fig.savefig(path, dpi=100)
    plt.close(fig)


RUN_FIGURES = ("accuracy", "auc", "train_accuracy", "val_accuracy")
ROW_FIGURES = ("difference", "low", "high")


def result_problem(result):
    """What is wrong with an ablations.json for table() and plot(), or None."""
    if not isinstance(result, dict):
        return f"{json_kind(result)}, not an object"
    for key, types in (("command", str), ("git_commit", str), ("machine", str),
                       ("minutes", (int, float)), ("rows", list), ("runs", dict)):
        if not isinstance(result.get(key), types) or isinstance(result.get(key), bool):
            return f"{json_kind(result.get(key)) if key in result else 'nothing'} as {key}"
    for name, run in result["runs"].items():
        if not isinstance(run, dict) or not all(is_number(run.get(k)) for k in RUN_FIGURES):
            return f"run {name!r} lacks a figure of {', '.join(RUN_FIGURES)}"
    for row in result["rows"]:
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in
                                                ("id", "claim", "verdict")):
            return "a row without its id, claim and verdict"
        if row.get("base") not in RUNS or row.get("variant") not in RUNS:
            return f"row {row['id']} compares runs that ablations.py does not know"
        ran = row["base"] in result["runs"] and row["variant"] in result["runs"]
        if ran and not all(is_number(row.get(k)) for k in ROW_FIGURES):
            return f"row {row['id']} lacks a figure of {', '.join(ROW_FIGURES)}"
    return None


def merged(out, result):
    """RESULT with the rows of OUT's earlier ablations.json that this invocation did not run,
    and their runs: `--rows` adds to the table instead of replacing it."""
    path = out / "ablations.json"
    if not path.is_file():
        return result
    old = read_input_json(path, result_problem, "the results of python ablations.py",
                          "move it away to start a new table")
    mine, order = {r["id"] for r in result["rows"]}, {r[0]: k for k, r in enumerate(ROWS)}
    kept = [r for r in old["rows"] if r["id"] not in mine and r["id"] in order]
    used = {name for r in kept for name in (r["base"], r["variant"])}
    earlier = [{**s, "rows": [i for i in s["rows"] if i not in mine]} for s in sittings(old)]
    now = {key: result[key] for key in ("command", "git_commit", "machine", "minutes")}
    return {**result, "rows": sorted(kept + result["rows"], key=lambda r: order[r["id"]]),
            "runs": {**{n: r for n, r in old["runs"].items() if n in used}, **result["runs"]},
            "sittings": [s for s in earlier if s["rows"]] + [{**now, "rows": sorted(mine, key=order.get)}]}


def write_outputs(result, out, docs):
    text = table(result)
    write_atomic(out / "ablations.md", text)
    if docs:
        write_docs(docs, text, marker="ablations")
    plot(result, out / "ablations.png")
    return text


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.tables_only:
        if not (out / "ablations.json").is_file():
            raise SystemExit(f"error: {out}: no ablations.json to make the table from; run "
                             "python ablations.py first")
        result = read_input_json(out / "ablations.json", result_problem,
                                 "the results of python ablations.py",
                                 "run python ablations.py again to rewrite it (finished steps "
                                 "are kept in its cache)")
        print(write_outputs(result, out, args.docs))
        return 0
    rows = selected_rows(args)
    check_dataset(args.data_root, ["ablations"])
    cache = out / "cache"
    state_path = cache / "state.json"
    state = read_state(state_path)  # checked before any run folder is claimed
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs, compared = run_rows(args, rows, state, state_path, cache)
    command = "python ablations.py " + " ".join(sys.argv[1:] if argv is None else map(str, argv))
    result = {"command": command.strip(), "git_commit": git_commit(), "minutes": args.minutes,
              "machine": cpu_model(), "rows": compared, "runs": runs,
              "step_commits": sorted({s["commit"] for s in state.values()}),
              "recipes": RECIPES,
              "wall_seconds_this_invocation": time.time() - started}
    result = merged(out, result)
    write_atomic(out / "ablations.json", json.dumps(result, indent=2))
    print(write_outputs(result, out, args.docs))
    print(f"wrote {out}/ablations.json, ablations.md and ablations.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
