"""Ship a trained checkpoint in the repository, so that verify.py, identify.py and the demo
work right after cloning: weights only, in half precision, with a model card.

    python ship_model.py CHECKPOINT [--view1 RESULTS_JSON] [--identify RESULTS_JSON]
        [--out models/lfw-compact.pt]

CHECKPOINT is a best_*.pt (the benchmark's `best` View 1 run); --view1 and --identify are the
results.json that evaluate.py wrote for it on pairsDevTest.txt (without and with --identify).
Their figures go into models/MODEL_CARD.md, with the checkpoint's thresholds by false-accept
rate (a checkpoint saved before training recorded them: `python calibrate.py CHECKPOINT`
first; re-shipping models/lfw-compact.pt itself is allowed). Every input is checked before
anything is written;
then the model and its card are replaced together, so that they never disagree. Exit 0 when
shipped, 2 on a bad input (one line naming it and the fix; nothing replaced). A model trained
later under logs/ takes precedence over the shipped one.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import model as m
import operating_points as op
from runtime import error_line, is_number, sha256_file, write_atomic

MAX_MB = 6  # the one checkpoint git may hold


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--view1", help="evaluate.py's results.json on pairsDevTest.txt")
    p.add_argument("--identify", help="evaluate.py --identify's results.json")
    p.add_argument("--out", default=str(m.SHIPPED))
    return p.parse_args(argv)


def card(ckpt, view1, ident, source):
    c, cfg = ckpt["model_config"], ckpt["config"]
    made_from = ckpt.get("source") or source
    n_val = len(ckpt.get("val_people") or [])
    lines = [
        "# Model card: `lfw-compact.pt`", "",
        f"- **What it is:** the `{c['model']}` siamese network ({c['loss']} loss, "
        f"{c['distance']} score, {c['embedding_dim']}-d embedding, {c['image_size']} px "
        f"{(ckpt.get('crop') or {}).get('mode', '?')} face crops), weights in half precision. "
        f"Made from `{made_from}` (commit `{str(ckpt.get('git_commit'))[:10]}`) by `ship_model.py`.",
        f"- **Trained on:** LFW only, from scratch: the {len(ckpt.get('train_people', []))} "
        f"people of the {cfg.get('split', 'view1')} training set, less the {n_val} held out "
        "for validation; no outside data, no pretrained weights.",
        *threshold_lines(ckpt),
    ]
    if view1:
        lines.append(f"- **View 1 DevTest** (people never seen in training): accuracy "
                     f"{view1['kfold']['mean']:.2%} ± {view1['kfold']['stderr']:.2%} (standard "
                     f"error over 10 folds), AUC {view1['auc']:.4f}, TAR@FAR=1e-3 "
                     f"{view1['tar@far=1e-3']:.2%}{' (with flip)' if view1.get('flip') else ''}.")
    if ident:
        lines.append(f"- **Identification** on the DevTest people: rank-1 {ident['rank1']:.2%}, "
                     f"rank-5 {ident['rank5']:.2%}, DIR at FAR 1% "
                     f"{ident['dir@far=0.01'] if ident['dir@far=0.01'] is None else format(ident['dir@far=0.01'], '.2%')}.")
    lines += [
        "- **Intended use:** research and demonstration of face verification and identification "
        "on a laptop CPU. Not for decisions about people.",
        "- **Known limits:** LFW is mostly frontal news photos of public figures, skewed toward "
        "adult white men, at 250 px; accuracy on other faces, poses, ages, lighting or cameras "
        "is unmeasured and likely lower.", ""]
    return "\n".join(lines)


def threshold_lines(ckpt):
    """The card's thresholds: the accuracy-optimal one and those by false-accept rate, with
    what each gives on the validation people."""
    ops = ckpt["operating_points"]
    acc = ops.get("accuracy") or {}
    seen = f" On every pair of the validation people it accepts {acc['far']:.1%} of " \
        f"different-person pairs and {acc['tar']:.1%} of same-person pairs." if acc else ""
    rates = "; ".join(f"FAR {k}: {p['threshold']:.4f} (TAR {p['tar']:.1%})"
                      for k, p in ops["points"].items())
    return [f"- **Threshold:** {ckpt['threshold']:.4f} on its score, the default (the best "
            "accuracy on the validation pairs of held-out training people); a score at or "
            f"above it means the same person.{seen}",
            f"- **Thresholds by false-accept rate** (`verify.py --far 1e-3`, `identify.py --far "
            f"1e-3`, the demo's strictness), from {ops['on']} ({ops['n_same']:,} same-person "
            f"and {ops['n_different']:,} different-person pairs): {rates}."]


class ShipError(Exception):
    """A bad input, as one line that names it and the fix; nothing has been written."""


# The figures the card quotes from each report (a path of keys into its results.json), and
# what each report is.
FIGURES = {"--view1": [("kfold", "mean"), ("kfold", "stderr"), ("auc",), ("tar@far=1e-3",)],
           "--identify": [("rank1",), ("rank5",)]}
REPORTS = {"--view1": "evaluate.py's results.json on pairsDevTest.txt (run without --identify)",
           "--identify": "evaluate.py --identify's results.json on pairsDevTest.txt"}


def figure(report, keys):
    for key in keys:
        report = report.get(key) if isinstance(report, dict) else None
    return report


def read_report(path, option, checkpoint):
    """The results.json given as OPTION, checked to be that report and of CHECKPOINT."""
    path, other = Path(path), "--identify" if option == "--view1" else "--view1"
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ShipError(f"{option} {path}: {what}; give {REPORTS[option]}")
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ShipError(f"{option} {path}: cannot be read as JSON ({error_line(e)}); give "
                        f"{REPORTS[option]}") from None
    if isinstance(report, dict) and all(figure(report, k) is not None for k in FIGURES[other]):
        raise ShipError(f"{option} {path}: this is the {other} report; pass it as {other}, "
                        f"and as {option} {REPORTS[option]}")
    missing = [".".join(k) for k in FIGURES[option] if not is_number(figure(report, k))]
    dir_far = report.get("dir@far=0.01", "") if isinstance(report, dict) else None
    if option == "--identify" and not (dir_far is None or is_number(dir_far)):
        missing.append("dir@far=0.01")  # None is a figure: FAR 1% was not reached
    if missing:
        raise ShipError(f"{option} {path}: no {', '.join(missing)} in it; give "
                        f"{REPORTS[option]}")
    digest = report.get("checkpoint_sha256")
    if digest and digest != sha256_file(checkpoint):
        raise ShipError(f"{option} {path}: its checkpoint_sha256 is not that of {checkpoint}, "
                        f"so its figures are of another model; evaluate {checkpoint} and give "
                        "that report")
    return report


def read_inputs(args):
    """Every input read and checked, and the card made, before anything is written."""
    try:
        _, ckpt = m.load_checkpoint(args.checkpoint)
        m.checkpoint_crop_settings(ckpt, args.checkpoint)  # a shipped model must take faces
        op.stored(ckpt, args.checkpoint)  # and say what its thresholds mean
    except m.CheckpointError as e:
        raise ShipError(str(e)) from None
    view1, ident = (read_report(p, o, args.checkpoint) if p else None
                    for p, o in ((args.view1, "--view1"), (args.identify, "--identify")))
    out = Path(args.out)
    for path in (out, out.parent / "MODEL_CARD.md"):
        if path.is_dir():
            raise ShipError(f"{path}: is a folder; move it away, or give --out a file in "
                            "another folder")
    try:
        text = card(ckpt, view1, ident, args.checkpoint)
    except (KeyError, TypeError, ValueError) as e:
        raise ShipError(f"{args.checkpoint}: lacks what the model card reports "
                        f"({error_line(e)}); pass a best_*.pt written by trainer2.py") from None
    return ckpt, out, text


def export_checked(ckpt, path, out, source):
    """The export written to PATH (a temporary file), refused when it is too large to ship."""
    m.export_weights(ckpt, path, source)
    size_mb = Path(path).stat().st_size / 2 ** 20
    if size_mb > MAX_MB:
        raise ShipError(f"{out}: the export takes {size_mb:.1f} MB, over the {MAX_MB} MB a "
                        "shipped model may take; ship a smaller network (nothing was replaced)")
    return size_mb


def write_model_and_card(ckpt, out, text, source):
    """Replace the model and its card together: the card's new text is on disk first, then
    the model is replaced, then the card. A failure before leaves both old files in place."""
    size = []

    def write_card(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        write_atomic(out, write=lambda t: size.append(export_checked(ckpt, t, out, source)))
    write_atomic(out.parent / "MODEL_CARD.md", write=write_card)
    return size[0]


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt, out, text = read_inputs(args)
        size_mb = write_model_and_card(ckpt, out, text, args.checkpoint)
    except ShipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only folder: the old files are still there
        print(f"error: cannot write {args.out} or its card ({error_line(e)})", file=sys.stderr)
        return 1
    print(f"wrote {out} ({size_mb:.1f} MB) and {out.parent / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
