"""Are the faces in two photos the same person?

    python verify.py IMAGE_A IMAGE_B [--checkpoint logs/<run>/best_accuracy.pt]
        [--far 1e-3 | --threshold T] [--json] [--device auto|cpu|cuda]

The checkpoint is loaded as an inference.FaceModel, the one object every entry point scores
through. Each photo's face is built with the crop settings the checkpoint's training crops
were made with (FaceModel.face: detector thresholds, minimum face, align or bbox, size,
margin and the JPEG round trip). One rule differs from the crops: with several faces, an
upload keeps the most prominent one (the crops keep the one nearest the centre, as LFW
labels them), and the output says so. Both faces are embedded at the net's input size and
in its precision (FaceModel.score_faces) and the score is compared with the threshold:
--threshold if given, else with --far the checkpoint's threshold for that false-accept rate
(1e-2, 1e-3 or 1e-4: about 1 in 100, 1,000 or 10,000 different-person pairs of its
validation people score above it), else its accuracy-optimal validation threshold. The
output says which, and what it means on the validation people.
Without --checkpoint, the newest logs/<run>/best_accuracy.pt is used, or with no run of your
own the model shipped in models/ (said on the first line).
Exit status: 0 same person, 1 different people, 2 an error (one line on stderr): a bad
argument (--device cuda without a GPU, a --threshold that is NaN or infinite), a file that
cannot be read, a photo without a face, or a model that scores the pair NaN. An error is
never 1, which means "different people". --json never prints NaN.
"""
import argparse
import json
import sys

import faces
import model as m
import operating_points as op
from inference import FaceModel, source_text
from runtime import DeviceError, NotFinite, error_line, finite, pick_device, set_threads

LOGS = "logs"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--checkpoint", default=None,
                   help=f"a best_*.pt (default: the newest {LOGS}/<run>/best_accuracy.pt)")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold on the score (wins over --far; default: the "
                        "checkpoint's accuracy-optimal one)")
    p.add_argument("--far", type=float, default=None,
                   help="false-accept rate: use the checkpoint's threshold for it "
                        "(1e-2, 1e-3 or 1e-4)")
    p.add_argument("--json", action="store_true", help="print a machine-readable result")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def face(fm, path, image):
    """The face of one photo as the checkpoint expects it, or a FaceError naming the file."""
    try:
        return fm.face(image)
    except faces.FaceError as e:
        raise faces.FaceError(f"{path}: {e}; use a photo where the face is clearly visible "
                              "and roughly frontal") from None


def verify(args):
    if args.threshold is not None:  # cheap checks first
        finite(args.threshold, "--threshold", "pass a score such as 0.5, or leave it out for "
               "the checkpoint's own")
    if args.far is not None:
        op.check_far(args.far)
    path = m.resolve_checkpoint(args.checkpoint, LOGS)  # a missing one said before any work
    images = [faces.read_image(p) for p in (args.image_a, args.image_b)]
    device = pick_device(args.device)
    set_threads()
    fm = FaceModel.load(path, device)
    threshold, source, meaning = fm.decision(args.threshold, args.far)  # before the faces
    (crop_a, info_a), (crop_b, info_b) = [face(fm, p, img) for p, img in
                                          zip((args.image_a, args.image_b), images)]
    warnings = [f"{p}: {info['n_faces']} faces found; used {info['rule_text']}"
                for p, info in ((args.image_a, info_a), (args.image_b, info_b))
                if info["n_faces"] > 1]
    threshold = finite(threshold, f"{path}: its threshold", "pass --threshold")
    score = finite(fm.score_faces(crop_a, crop_b), f"{path}: the pair's score",
                   "its weights are damaged; pass another checkpoint")
    same = score >= threshold
    return {"verdict": "same person" if same else "different people", "same": bool(same),
            "score": score, "threshold": float(threshold),
            "threshold_source": source, "threshold_meaning": meaning, "far": args.far,
            "checkpoint": str(path), "shipped": fm.shipped, "model_line": fm.describe(LOGS),
            "images": [str(args.image_a), str(args.image_b)],
            "faces_per_image": [info_a["n_faces"], info_b["n_faces"]],
            "boxes": [info_a["box"], info_b["box"]], "crop_settings": fm.settings,
            "warnings": warnings}


def main(argv=None):
    args = parse_args(argv)
    try:
        result = verify(args)
        text = json.dumps(result, indent=2, allow_nan=False)  # every float checked in verify
    except (DeviceError, NotFinite, faces.FaceError, m.CheckpointError, op.BadRate) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # any other failure is an error too, never a verdict (exit 1)
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    if args.json:
        print(text)
    else:
        if result["shipped"]:
            print(result["model_line"])
        for w in result["warnings"]:
            print(f"warning: {w}")
        print(f"{result['verdict']}: score {result['score']:.4f} "
              f"{'>=' if result['same'] else '<'} threshold {result['threshold']:.4f} "
              f"({source_text(result['threshold_source'], result['far'])}; "
              f"{result['checkpoint']})")
        if result["threshold_meaning"]:
            print(f"threshold: {result['threshold_meaning']}")
        c = result["crop_settings"]
        print(f"faces: {c['mode']} crops of {c['size']} px with min_face {c['min_face']} and "
              f"JPEG quality {c['jpeg_quality']}, the settings of the checkpoint's training crops")
    return 0 if result["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
