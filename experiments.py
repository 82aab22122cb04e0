"""Running the project's own scripts as resumable steps: what benchmark.py and ablations.py
share. Each step is a subprocess (trainer2.py, evaluate.py, ...) whose log goes to a file;
every finished step is remembered in a state file, so a killed run picks up where it stopped.
"""
import csv
import json
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from runtime import git_commit, write_atomic

HERE = Path(__file__).resolve().parent
# Each recipe: trainer2.py overrides, evaluate.py flags, and the share of the budget that each
# View 2 fold trains for.
RECIPES = {
    # The paper's recipe as the old project meant to run it, its bugs fixed.
    "seed": {"train": ["--model=koch", "--loss=bce", "--distance=l1", "--optimizer=adam",
                       "--lr=1e-4", "--weight_decay=0.0", "--image_size=105", "--init=koch",
                       "--batch_size=64", "--augment_p=0.5"],
             "eval": [], "fold_share": 0.1},
    # trainer2.py's defaults, with flip test-time augmentation.
    "best": {"train": [], "eval": ["--flip"], "fold_share": 0.2},
}


def add_step_arguments(p, what):
    """The options train_cmd and eval_cmd read, on the argparse parser P of a command that
    runs steps; WHAT says which document gets its table."""
    p.add_argument("--data-root", default="dataset",
                   help="LFW as download_data.py leaves it: images/ and the protocol files")
    p.add_argument("--crops", default="cropped_dataset",
                   help="the face crops (crop_dataset_to_faces.py's output folder)")
    p.add_argument("--logs", default="logs", help="where the training runs go")
    p.add_argument("--docs", default=str(HERE),
                   help=f"folder whose {what} get the table ('' for none)")
    p.add_argument("--train-args", default="",
                   help="extra trainer2.py overrides for every run (for quick trials)")


def run_step(name, cmd, state, state_path, log_dir):
    """Run one command unless state says it finished; its output goes to LOG_DIR/<name>.log."""
    if name in state:
        return state[name]
    log = log_dir / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, *map(str, cmd)], cwd=HERE, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"error: step {name} failed (exit {done.returncode}): {tail[0]}; "
                         f"full log in {log}. Fix it and run the same command again: finished "
                         "steps are kept")
    # The commit that ran the step: cached steps keep theirs when later code reruns the rest.
    state[name] = {"seconds": time.time() - t0, "log": str(log), "commit": git_commit(),
                   "peak_rss_mb": peak_rss_mb()}
    write_atomic(state_path, json.dumps(state, indent=2))  # a kill never loses the resume state
    return state[name]


def claim_run_dir(run_dir, out):
    """Empty RUN_DIR for a step this cache has not finished (a crash leaves half a run), but never
    delete a run that a command with another --out (or a person) made there."""
    run_dir, mark = Path(run_dir), Path(run_dir) / "benchmark_out.txt"
    owner = mark.read_text().strip() if mark.exists() else None
    if (run_dir / "config.json").exists() and owner != str(Path(out).resolve()):
        raise SystemExit(f"error: {run_dir} holds a training run that this command (--out "
                         f"{out}) did not start; pass another --logs folder, or move the run away")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    mark.write_text(str(Path(out).resolve()))


def train_cmd(args, recipe, run_dir, minutes, extra, snapshots=()):
    """trainer2.py with RECIPE's overrides, then EXTRA, then --train-args; SNAPSHOTS are
    shares of the budget at which to save snapshot_<m>min.pt too."""
    shares = ",".join(f"{minutes * s:g}" for s in snapshots)
    return ["trainer2.py", f"--data_dir={args.crops}", f"--protocol_dir={args.data_root}",
            # An absolute run_name: trainer2.py puts a bare name under logs/ itself.
            f"--max_minutes={minutes:g}", "--epochs=100000", f"--run_name={Path(run_dir).resolve()}",
            f"--snapshot_minutes={shares}", *RECIPES[recipe]["train"], *extra,
            *args.train_args.split()]


def eval_cmd(args, recipe, ckpt, pairs, out, fold=None, data=None):
    return ["evaluate.py", ckpt, "--data", data or args.crops, "--pairs", pairs, "--out", out,
            *RECIPES[recipe]["eval"], *([] if fold is None else ["--fold", str(fold)])]


def peak_rss_mb():
    """Largest resident memory of any step run so far by this invocation."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def read_json(path):
    return json.loads(Path(path).read_text())


def train_speed(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return float(np.mean([float(r["images_per_s"]) for r in csv.DictReader(f)]))


def metrics_rows(run_dir):
    """A run's metrics.csv, one dict per evaluation."""
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def write_docs(docs, text, marker="benchmark"):
    """TEXT between <!-- MARKER:start --> and <!-- MARKER:end --> of DOCS' README and RECIPE."""
    for name in ("README.md", "RECIPE.md"):
        path = Path(docs) / name
        if not path.exists():
            continue
        doc = path.read_text()
        new = re.sub(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)",
                     lambda m: m.group(1) + text + m.group(2), doc, flags=re.S)
        write_atomic(path, new)


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# The protocol files each job reads (View 1 also times an evaluation on pairs.txt).
NEEDS = {"view1": ["pairsDevTest.txt", "pairs.txt"], "view2": ["pairs.txt", "people.txt"],
         "ablations": ["pairsDevTest.txt", "peopleDevTrain.txt"]}


def check_dataset(root, jobs):
    """ROOT as download_data.py leaves it: images/ and the protocol files that JOBS read."""
    root = Path(root)
    missing = [] if (root / "images").is_dir() else ["images/"]
    missing += sorted({f for job in jobs for f in NEEDS[job] if not (root / f).is_file()})
    if missing:
        raise SystemExit(f"error: {root}: no {', '.join(missing)}; make it with `make data` "
                         "(download_data.py), or pass --lfw with a folder holding an LFW "
                         "archive and the protocol files")
