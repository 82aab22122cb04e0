"""Ship a trained checkpoint in the repository, so that verify.py, identify.py and the demo
work right after cloning: weights only, in half precision, with a model card.

    python ship_model.py CHECKPOINT [--view1 RESULTS_JSON] [--identify RESULTS_JSON]
        [--out models/lfw-compact.pt]

CHECKPOINT is a best_*.pt (the benchmark's `best` View 1 run); --view1 and --identify are the
results.json that evaluate.py wrote for it on pairsDevTest.txt (with and without --identify).
Their figures go into models/MODEL_CARD.md. A model trained later under logs/ takes
precedence over the shipped one.
"""
import argparse
import json
import sys
from pathlib import Path

import model as m
from runtime import write_atomic

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
    lines = [
        "# Model card: `lfw-compact.pt`", "",
        f"- **What it is:** the `{c['model']}` siamese network ({c['loss']} loss, "
        f"{c['distance']} score, {c['embedding_dim']}-d embedding, {c['image_size']} px "
        f"{(ckpt.get('crop') or {}).get('mode', '?')} face crops), weights in half precision. "
        f"Made from `{source}` (commit `{str(ckpt.get('git_commit'))[:10]}`) by `ship_model.py`.",
        f"- **Trained on:** LFW only, from scratch: the {len(ckpt.get('train_people', []))} "
        f"people of the {cfg.get('split', 'view1')} training set, less the "
        f"{cfg.get('val_fraction', 0):.0%} held out for the validation pairs; no outside data, "
        "no pretrained weights.",
        f"- **Threshold:** {ckpt['threshold']:.4f} on its score (chosen on the validation pairs "
        "of held-out training people); a score at or above it means the same person.",
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


def main(argv=None):
    args = parse_args(argv)
    try:
        _, ckpt = m.load_checkpoint(args.checkpoint)
        m.checkpoint_crop_settings(ckpt, args.checkpoint)  # a shipped model must take faces
    except m.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    view1, ident = (json.loads(Path(p).read_text()) if p else None
                    for p in (args.view1, args.identify))
    out = Path(args.out)
    m.export_weights(ckpt, out)
    size_mb = out.stat().st_size / 2 ** 20
    if size_mb > MAX_MB:
        out.unlink()
        print(f"error: {out}: {size_mb:.1f} MB is over the {MAX_MB} MB a shipped model may take; "
              "ship a smaller network", file=sys.stderr)
        return 1
    write_atomic(out.parent / "MODEL_CARD.md", card(ckpt, view1, ident, args.checkpoint))
    print(f"wrote {out} ({size_mb:.1f} MB) and {out.parent / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
