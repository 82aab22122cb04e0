"""Add false-accept thresholds to a checkpoint saved before training recorded them.

    python calibrate.py CHECKPOINT [--data DIR] [--protocol-dir DIR]
        [--device auto|cpu|cuda]

Training stores, in every best_*.pt, the thresholds at FAR 1e-2, 1e-3 and 1e-4 measured on
every pair of its validation people's images (operating_points.py). An older checkpoint, or
the shipped model made from one, lacks them, and verify.py --far says so. This script
measures them as training would have: the checkpoint's own validation people (those it
stores, or those its split settings give, checked against its list of training people so
that no test person slips in), every image of theirs in --data embedded once at the
checkpoint's input size and precision, every pair among them scored. Then the file is
rewritten in place, atomically, with `operating_points` and `val_people` added; nothing else
in it changes. Exit 0 done, 2 an error (one line naming the file and the fix).
"""
import argparse
import sys
from pathlib import Path

import torch

import dataset as ds
import model as m
import operating_points as op
from inference import FaceModel
from runtime import DeviceError, error_line, pick_device, set_threads, write_atomic

SPLIT_KEYS = ("split", "seed", "val_fraction", "val_pairs", "slice_of_data", "fold")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a best_*.pt, or models/lfw-compact.pt")
    p.add_argument("--data", default=None,
                   help="the face crops it was trained on (default: its data_dir)")
    p.add_argument("--protocol-dir", default=None,
                   help="where download_data.py put people*.txt (default: its protocol_dir, "
                        "else dataset)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def validation_people(ckpt, path, data, protocol_dir):
    """The names of the checkpoint's validation people: stored, or recomputed from its split
    settings (trainer.py's defaults for those an export did not keep) and accepted only when
    they give back its training people exactly, in order."""
    if ckpt.get("val_people"):
        return list(ckpt["val_people"])
    cfg = ckpt.get("config") or {}
    settings = {k: cfg[k] for k in SPLIT_KEYS if k in cfg}
    split = ds.make_split(data, protocol_dir, with_test=False, **settings)
    if sorted(split["train"]) + list(split["val_people"]) != list(ckpt.get("train_people", [])):
        raise m.CheckpointError(
            f"{path}: the split settings it keeps ({settings or 'none'}) do not give back its "
            f"training people in {data}, so its validation people are unknown; pass the --data "
            "it was trained on, or retrain: new checkpoints record their thresholds")
    return list(split["val_people"])


def measure(fm, names, people):
    """operating_points.record of every pair of these people's images."""
    missing = [n for n in names if n not in people]
    if missing:
        raise m.CheckpointError(f"{len(missing)} validation people ({', '.join(missing[:3])}"
                                "...) have no images in the data folder; pass the --data it "
                                "was trained on")
    paths = [p for n in names for p in people[n]]
    emb = fm.embed(ds.decode_all(paths, fm.image_size, desc="embed"))
    ids = [p.parent.name for p in paths]
    pairs = op.embedding_pairs(fm.score_matrix, fm.prepare_gallery(emb), emb, ids,
                               thresholds=(fm.threshold,))
    return op.record(pairs, len(paths), len(names), fm.threshold)


def calibrate(args):
    path = Path(args.checkpoint)
    device = pick_device(args.device)
    set_threads()
    fm = FaceModel.load(path, device)
    data = Path(args.data or fm.ckpt.get("config", {}).get("data_dir", "cropped_dataset"))
    people = ds.read_identities(data)
    protocol_dir = args.protocol_dir or fm.ckpt.get("config", {}).get("protocol_dir", "dataset")
    names = validation_people(fm.ckpt, path, data, protocol_dir)
    record = measure(fm, names, people)
    raw = m.read_torch_file(path, "pass a best_*.pt written by trainer2.py")
    raw.update(operating_points=record, val_people=names)
    write_atomic(path, write=lambda tmp: torch.save(raw, tmp))
    return record


def main(argv=None):
    args = parse_args(argv)
    try:
        record = calibrate(args)
    except (m.CheckpointError, ds.ProtocolError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.checkpoint}: cannot rewrite it ({error_line(e)}); check its "
              "folder's permissions and free space (the file is unchanged)", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: thresholds from {record['on']} ({record['n_same']:,} same-person "
          f"and {record['n_different']:,} different-person pairs)")
    for key, point in record["points"].items():
        print(f"  FAR {key:>6}: threshold {point['threshold']:.4f}, TAR {point['tar']:.2%}")
    if "accuracy" in record:
        a = record["accuracy"]
        print(f"  best accuracy threshold {a['threshold']:.4f}: FAR {a['far']:.2%}, "
              f"TAR {a['tar']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
