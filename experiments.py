"""Running the project's own scripts as resumable steps: what benchmark.py and ablations.py
share. Each step is a subprocess (trainer.py, trainer2.py, evaluate.py, ...) whose log goes
to a file; every finished step is remembered in a state file under its step name (never its
command line), so a killed run picks up where it stopped.
"""
import csv
import importlib
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

import trainer2
import training
from runtime import error_line, git_commit, write_atomic

HERE = Path(__file__).resolve().parent
# Each recipe: the trainer file whose defaults it runs, its overrides on them (none: each recipe
# is its trainer's defaults, run on the face crops), evaluate.py flags, and the share of the
# budget that each View 2 fold trains for.
RECIPES = {
    # trainer.py's defaults: the paper's recipe as the old project meant to run it, bugs fixed.
    "seed": {"trainer": "trainer.py", "train": [], "eval": [], "fold_share": 0.1},
    # trainer2.py's defaults, with flip test-time augmentation. A View 2 fold trains a third of
    # the budget (10 of 30 minutes): validation peaks at minutes 10-14 of a View 1 run.
    "best": {"trainer": "trainer2.py", "train": [], "eval": ["--flip"], "fold_share": 1 / 3},
    # trainer_pretrained.py's defaults: EfficientNet-Lite0 fine-tuned from ImageNet, with flip.
    # View 1 only (fold_share None): its ten folds at 10 minutes would take make bench past
    # six hours on 2 cores.
    "pretrained": {"trainer": "trainer_pretrained.py", "train": [], "eval": ["--flip"],
                   "fold_share": None},
}
# What every recipe's run sets, so that its time budget ends it: no epoch count comes first, and
# every recipe waits trainer2.py's patience for a better validation score (trainer.py's is
# meant for a 30-epoch run).
BUDGET = ["--epochs=100000", f"--patience={trainer2.patience}"]


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
                   help="extra trainer overrides (--name=value) for every run (for quick "
                        "trials)")


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
    """RECIPE's trainer with its overrides, then EXTRA, then --train-args; SNAPSHOTS are shares
    of the budget at which to save snapshot_<m>min.pt too."""
    shares = ",".join(f"{minutes * s:g}" for s in snapshots)
    return [RECIPES[recipe]["trainer"], f"--data_dir={args.crops}",
            f"--protocol_dir={args.data_root}", f"--max_minutes={minutes:g}", *BUDGET,
            # An absolute run_name: a trainer puts a bare name under logs/ itself.
            f"--run_name={Path(run_dir).resolve()}", f"--snapshot_minutes={shares}",
            *RECIPES[recipe]["train"], *extra, *args.train_args.split()]


def trainer_namespace(script):
    """The globals of a trainer file (trainer.py, trainer2.py): its hyperparameters' defaults."""
    return vars(importlib.import_module(Path(script).stem))


def trainer_config(cmd):
    """The settings that a trainer command such as train_cmd's trains with, as training reads
    them: the trainer file's defaults, then the command's --name=value overrides, checked."""
    return training.load_config(trainer_namespace(cmd[0]), cmd[1:])


def eval_cmd(args, recipe, ckpt, pairs, out, fold=None, data=None):
    return ["evaluate.py", ckpt, "--data", data or args.crops, "--pairs", pairs, "--out", out,
            *RECIPES[recipe]["eval"], *([] if fold is None else ["--fold", str(fold)])]


def peak_rss_mb():
    """Largest resident memory of any step run so far by this invocation."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def read_json(path):
    return json.loads(Path(path).read_text())


def input_error(message):
    """A bad input file: MESSAGE on one line, exit 2 (a usage or input error)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def json_kind(value):
    """VALUE's type in JSON's words, for error messages."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             type(None): "null", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def read_input_json(path, problem, what, fix):
    """PATH parsed and checked by PROBLEM (a function: the value -> what is wrong, or None)
    before anything acts on it; one line naming the file, WHAT it should be and FIX if not."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        input_error(f"error: {path}: cannot be read as JSON ({error_line(e)}); {fix}")
    wrong = problem(value)
    if wrong:
        input_error(f"error: {path}: not {what} ({wrong}); {fix}")
    return value


# What run_step records of a finished step; "log" is read back (the crop speed is in it), the
# others were added over time and may be absent from an older state.
STEP_FIELDS = {"log": (str,), "seconds": (int, float), "commit": (str,),
               "peak_rss_mb": (int, float)}


def state_problem(state):
    """What is wrong with a state file's content, or None: {step name: {log, seconds, ...}}."""
    if not isinstance(state, dict):
        return f"{json_kind(state)}, not an object of finished steps"
    for name, step in state.items():
        if not isinstance(step, dict):
            return f"step {name!r} is {json_kind(step)}, not an object"
        if "log" not in step:
            return f"step {name!r} has no log"
        for key, types in STEP_FIELDS.items():
            value = step.get(key)
            if key in step and (isinstance(value, bool) or not isinstance(value, types)):
                return f"step {name!r} has {json_kind(value)} as {key}"
    return None


def read_state(path):
    """The finished steps remembered in PATH, {} when there is none yet. Checked before any
    step runs: a state misread as "nothing done" would empty the finished runs' folders."""
    if not Path(path).exists():
        return {}
    return read_input_json(path, state_problem, "a state file of finished steps",
                           "restore it, or delete it to run every step again (this command's "
                           "own run folders are then trained again); nothing was changed")


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
