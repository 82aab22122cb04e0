"""Combine trained nets into one ensemble checkpoint that verify.py, identify.py, evaluate.py
and the demo use like any other.

    python ensemble.py MEMBER MEMBER [MEMBER ...] --out logs/<name> [--data DIR]
        [--protocol-dir DIR] [--device auto|cpu|cuda]

A MEMBER is a run folder (its best_accuracy.pt) or a checkpoint (best_*.pt, snapshot_*.pt:
snapshots of one run make a snapshot ensemble). The ensemble embeds a face with every member,
each in its own precision, L2-normalises each embedding and concatenates them, so that a
pair's score is the mean of the members' cosine scores. Members must be cosine nets of one
input size and crop, validated on the same people: train them on one --seed with different
--member_seed (another initialisation and data order, the same people split), or a member's
training people could be another's validation people and the ensemble's validation figure
would be a lie. The ensemble is validated as training validates a net (accuracy threshold,
FAR thresholds on every pair of the validation people's images) and written to
OUT/best_accuracy.pt. Exit 0 done, 2 an error (one line naming the file and the fix).
"""
import argparse
import sys
from pathlib import Path

import torch

import dataset as ds
import model as m
import trainer2
import training
from recipes import defaults_of
from runtime import DeviceError, error_line, git_commit, pick_device, set_threads, write_atomic


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("members", nargs="+", help="run folders or checkpoints, two or more")
    p.add_argument("--out", required=True, help="the ensemble's folder (logs/<name>)")
    p.add_argument("--data", default=None,
                   help="the face crops the members trained on (default: the first's data_dir)")
    p.add_argument("--protocol-dir", default=None,
                   help="the protocol files (default: the first member's protocol_dir)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def load_members(given, device):
    """[(path, net, checkpoint)] of every member; CheckpointError naming the one that fails."""
    if len(given) < 2:
        raise m.CheckpointError("an ensemble needs two members or more; pass their run "
                                "folders or checkpoints")
    out = []
    for g in given:
        path = m.resolve_checkpoint(g)
        net, ckpt = m.load_checkpoint(path, device)
        out.append((path, net, ckpt))
    return out


def unfit(net, ckpt, first, first_path):
    """Why a member cannot join an ensemble whose first member is FIRST, or None."""
    if net.head is not None or net.distance != "cosine":
        return "it scores pairs with a learned head or an L1 distance, not a cosine"
    size, first_size = ckpt["model_config"]["image_size"], first["model_config"]["image_size"]
    if size != first_size:
        return f"its input is {size} px, {first_path}'s {first_size} px"
    if ckpt.get("crop") != first.get("crop"):
        return f"its faces were cropped with other settings than {first_path}'s"
    if not ckpt.get("val_people"):
        return "it stores no validation people (saved before training recorded them)"
    if (ckpt["val_people"], ckpt.get("train_people")) != (first["val_people"],
                                                          first.get("train_people")):
        return (f"it was trained and validated on other people than {first_path}; train every "
                "member on one --seed, with another --member_seed each")
    return None


def check_members(members):
    """One line naming the first member that cannot join the first one, and why."""
    first_path, _, first = members[0]
    for path, net, ckpt in members:
        why = unfit(net, ckpt, first, first_path)
        if why:
            raise m.CheckpointError(f"{path}: cannot join the ensemble ({why})")


def build(members):
    """The ensemble SiameseNet and its model_config, from members that passed check_members."""
    configs = [ckpt["model_config"] for _, _, ckpt in members]
    if any(c["model"] == "ensemble" for c in configs):
        raise m.CheckpointError("a member is an ensemble itself; pass its members instead")
    precision = [bool(ckpt.get("config", {}).get("mixed_precision", False))
                 for _, _, ckpt in members]
    first = configs[0]
    model_config = {"model": "ensemble", "image_size": first["image_size"], "loss": first["loss"],
                    "distance": "cosine", "init": first["init"], "members": configs,
                    "member_precision": precision}
    net = m.build_model(model_config)
    for member, (_, trained, _) in zip(net.backbone.members, members):
        member.load_state_dict(trained.backbone.state_dict())
    return net.eval(), model_config


def combine(args):
    device = pick_device(args.device)
    set_threads()
    members = load_members(args.members, device)
    check_members(members)
    net, model_config = build(members)
    first = members[0][2]
    cfg = training.validation_config(first, defaults_of(vars(trainer2)), device, args.data,
                                     args.protocol_dir)
    data = training.build_data(cfg)
    if sorted(data.val_people) != sorted(first["val_people"]):
        raise m.CheckpointError(f"{cfg['data_dir']}: its split gives other validation people "
                                "than the members were validated on; pass the --data and "
                                "--protocol-dir they trained with")
    row = training.validate(net, cfg, data, device)
    net.eval()
    ckpt = {"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "model_config": model_config, "crop": first.get("crop"),
            "config": {**cfg, "run_name": str(args.out)}, "epoch": None, "step": None,
            "metrics": row, "threshold": row["threshold"],
            "operating_points": row["operating_points"],
            "train_people": first["train_people"], "val_people": first["val_people"],
            "members": [{"path": str(p), "val_accuracy": c["metrics"].get("accuracy")}
                        for p, _, c in members], "git_commit": git_commit()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "best_accuracy.pt", write=lambda tmp: torch.save(ckpt, tmp))
    return ckpt


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = combine(args)
    except (m.CheckpointError, ds.ProtocolError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {args.out}: cannot write the ensemble there ({error_line(e)}); check "
              "the folder's permissions and free space", file=sys.stderr)
        return 2
    for member in ckpt["members"]:
        print(f"member {member['path']}: validation accuracy {member['val_accuracy']:.2%}")
    row, points = ckpt["metrics"], ckpt["operating_points"]["points"]
    print(f"ensemble of {len(ckpt['members'])}: validation accuracy {row['accuracy']:.2%}, AUC "
          f"{row['auc']:.4f}, TAR " + ", ".join(f"{p['tar']:.1%} at FAR {k}"
                                              for k, p in points.items()))
    print(f"wrote {Path(args.out) / 'best_accuracy.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
