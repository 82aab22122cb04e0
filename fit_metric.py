"""Learn a metric on a trained net's embeddings (PCA whitening, then WCCN) and write it as a
checkpoint that verify.py, identify.py, evaluate.py and the demo use like any other.

    python fit_metric.py RUN_OR_CHECKPOINT --out logs/<name> [--data DIR]
        [--protocol-dir DIR] [--device auto|cpu|cuda]

The net never trained on its validation people, so their embeddings show its real
within-person spread; its training people's would understate it. Those people are split in
two: the metric is fitted on the first half (its kind and size chosen by fitting on half of
that half and ranking the other's pairs), and the checkpoint is validated on the second half
only, thresholds and FAR points included, next to the base net on the same pairs. The base can
be any cosine net, an ensemble included (ensemble.py). Exit 0 done, 2 an error (one line
naming the file and the fix).
"""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

import dataset as ds
import metric_learning as ml
import model as m
import trainer2
import training
from recipes import defaults_of
from runtime import (DeviceError, autocast, error_line, git_commit, pick_device, set_threads,
                     write_atomic)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base", help="a run folder (its best_accuracy.pt) or a checkpoint")
    p.add_argument("--out", required=True, help="the new checkpoint's folder (logs/<name>)")
    p.add_argument("--data", default=None,
                   help="the face crops the net trained on (default: its data_dir)")
    p.add_argument("--protocol-dir", default=None,
                   help="the protocol files (default: the net's protocol_dir)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def check_base(net, ckpt, path):
    if net.head is not None or net.distance != "cosine":
        raise m.CheckpointError(f"{path}: it scores pairs with a learned head or an L1 "
                                "distance; a metric is learned on a cosine net's embeddings")
    if ckpt["model_config"]["model"] == "metric":
        raise m.CheckpointError(f"{path}: it has a learned metric already; pass its base net")
    if not ckpt.get("val_people"):
        raise m.CheckpointError(f"{path}: it stores no validation people (saved before "
                                "training recorded them); retrain it with trainer2.py")


def halves_of(data, seed):
    """(the fitting half's {name: images}, data whose validation is the other half only)."""
    fit_names, test_names = ml.halves(data.val_people, seed)
    keep = set(test_names)
    pairs = [(a, b, y) for a, b, y in data.val_pairs
             if a.parent.name in keep and b.parent.name in keep]
    test = SimpleNamespace(**{**vars(data), "val_pairs": pairs,
                              "val_people": {n: data.val_people[n] for n in test_names}})
    return {n: data.val_people[n] for n in fit_names}, test


def fitted_net(net, ckpt, people, data, cfg, device):
    """The base net with the metric fitted on PEOPLE's images, its model_config and choice."""
    paths = [p for name in sorted(people) for p in people[name]]
    amp = bool(ckpt.get("config", {}).get("mixed_precision", False))
    with autocast(amp, device):
        emb = m.embed_images(net, torch.stack([data.bank[p] for p in paths]),
                             ds.eval_transform(), cfg["batch_size"], device)
    ids = [p.parent.name for p in paths]
    try:
        kind, dim, tried = ml.select(emb, ids)
    except ValueError:
        raise m.CheckpointError(f"{cfg['run_name']}: its {2 * len(people)} or so validation "
                                "people are too few to fit a metric on a quarter of them and "
                                "rank the pairs of another; train with a larger val_fraction"
                                ) from None
    mean, proj = ml.fit(emb, ids, dim, kind)
    base = ckpt["model_config"]
    model_config = {"model": "metric", "image_size": base["image_size"], "loss": base["loss"],
                    "distance": "cosine", "init": base["init"], "base": base,
                    "base_precision": amp, "dim": proj.shape[1], "kind": kind}
    fitted = m.build_model(model_config)
    fitted.backbone.base.load_state_dict(net.backbone.state_dict())
    fitted.backbone.mean.copy_(mean)
    fitted.backbone.proj.copy_(proj)
    return fitted.to(device).eval(), model_config, tried


def learn(args):
    device = pick_device(args.device)
    set_threads()
    path = m.resolve_checkpoint(args.base)
    net, ckpt = m.load_checkpoint(path, device)
    check_base(net, ckpt, path)
    cfg = training.validation_config(ckpt, defaults_of(vars(trainer2)), device, args.data,
                                     args.protocol_dir)
    data = training.build_data(cfg)
    if sorted(data.val_people) != sorted(ckpt["val_people"]):
        raise m.CheckpointError(f"{cfg['data_dir']}: its split gives other validation people "
                                "than the net was validated on; pass the --data and "
                                "--protocol-dir it trained with")
    fit_people, test_data = halves_of(data, cfg["seed"])
    fitted, model_config, tried = fitted_net(net, ckpt, fit_people, data, cfg, device)
    base_row = training.validate(net, {**cfg, "mixed_precision": model_config["base_precision"]},
                                 test_data, device)
    row = training.validate(fitted, cfg, test_data, device)
    fitted.eval()
    out = {"model": {k: v.detach().cpu() for k, v in fitted.state_dict().items()},
           "model_config": model_config, "crop": ckpt.get("crop"),
           "config": {**cfg, "run_name": str(args.out)}, "epoch": None, "step": None,
           "metrics": row, "threshold": row["threshold"],
           "operating_points": row["operating_points"],
           "train_people": ckpt["train_people"], "val_people": ckpt["val_people"],
           "metric": {"base": str(path), "fit_people": sorted(fit_people), "tried_auc": tried,
                      "base_metrics": {k: base_row[k] for k in ("accuracy", "auc")},
                      "pairs": len(test_data.val_pairs)},
           "git_commit": git_commit()}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "best_accuracy.pt", write=lambda tmp: torch.save(out, tmp))
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = learn(args)
    except (m.CheckpointError, ds.ProtocolError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out}: cannot write the checkpoint there ({error_line(e)}); check "
              "the folder's permissions and free space", file=sys.stderr)
        return 2
    info, row = ckpt["metric"], ckpt["metrics"]
    print(f"metric {ckpt['model_config']['kind']}-{ckpt['model_config']['dim']} fitted on "
          f"{len(info['fit_people'])} validation people; on the other half's "
          f"{info['pairs']} pairs: accuracy {row['accuracy']:.2%} (base "
          f"{info['base_metrics']['accuracy']:.2%}), AUC {row['auc']:.4f} (base "
          f"{info['base_metrics']['auc']:.4f})")
    print(f"wrote {Path(args.out) / 'best_accuracy.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
