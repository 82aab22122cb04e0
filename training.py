"""The training engine that trainer.py and trainer2.py call: main(globals()).

One readable loop, in named steps: build the data, the model and the optimizer; restore a
run; train one epoch; evaluate on validation pairs from training people and write the
records (metrics.csv, TensorBoard, best_*.pt, curves.png); stop early or when the Budget is
spent. Runs alone or under `torchrun --nproc_per_node=N` (gloo on CPU, nccl on GPU).

Kill-safety: at the end of an epoch last.pt is written first, holding the epoch's validation
row, and the records are written from it after. A run killed at any moment resumes from
last.pt and rewrites any record that the kill cut short, so a resumed run's records are
exactly an uninterrupted run's.
"""
import csv
import difflib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import dataset as ds
import faces
import losses
import metrics
import operating_points as op
import pairs
from backbones import PretrainedWeightsMissing
from recipes import defaults_of, help_text
from model import (CheckpointError, ModelConfig, build_model, read_torch_file,
                   score_pairs)
from runtime import (autocast, free_cores, git_commit, pick_device, seed_everything,
                     set_threads, write_atomic)

# The held-out pairs of a --split=random run, in its folder: evaluate.py finds them there.
TEST_PAIRS = "test_pairs.csv"
METRICS = ("accuracy", "precision", "recall", "f1", "auc", "loss")  # one best_*.pt each
CSV_FIELDS = ("epoch", "step", "minutes", "lr", "train_loss", "loss", "accuracy", "precision",
              "recall", "f1", "auc", "threshold", "images_per_s")
TRAINING_CHOICES = {"optimizer": ("adam", "sgd"), "split": ("view1", "view2", "random"),
                    "early_stopping_metric": METRICS}


# ------------------------------------------------------------------ hyperparameters

def parse_value(name, text, default):
    """Convert a command-line string to the type of the default value."""
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
    elif isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            pass
    elif isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            pass
    else:  # str or None: keep the text; "None" means None
        return None if text == "None" else text
    raise SystemExit(f"error: --{name} expects a {type(default).__name__}, got {text!r}")


def apply_overrides(config, argv):
    """--name=value overrides, type-checked against the defaults."""
    config = dict(config)
    for arg in argv:
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"error: expected --name=value, got {arg!r}")
        if name not in config:
            near = sorted(k for k in config if k.endswith(f"_{name}")) or \
                difflib.get_close_matches(name, config, n=3)  # margin -> *_margin; epoch -> epochs
            hint = f"did you mean {' or '.join(near)}? " if near else ""
            raise SystemExit(f"error: unknown hyperparameter {name!r}; {hint}valid names: "
                             + ", ".join(sorted(config)))
        config[name] = parse_value(name, text, config[name])
    return config


def check_config(cfg):
    """Every setting checked before anything is created: a bad value leaves no run folder."""
    try:
        ModelConfig.from_dict(cfg)  # the model's own choices and ranges
        pick_device(cfg["device"])  # DeviceError: cuda without a GPU, an unknown name
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for key, allowed in TRAINING_CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"error: {key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    for key in ("batch_size", "epochs", "calc_metrics_interval", "patience", "val_pairs",
                "per_person", "lr_cycles"):
        if cfg[key] < 1:
            raise SystemExit(f"error: {key}={cfg[key]} must be at least 1")
    if cfg["max_minutes"] < 0 or cfg["num_workers"] < 0 or cfg["ema"] < 0 or cfg["ema"] >= 1:
        raise SystemExit("error: max_minutes and num_workers must be >= 0, ema in [0, 1)")
    if cfg["member_seed"] < 0:
        raise SystemExit(f"error: member_seed={cfg['member_seed']} must be at least 0")


def load_config(namespace, argv):
    """The trainer's defaults, then (with --resume) the saved run's, then the command line."""
    defaults = defaults_of(namespace)
    cfg = apply_overrides(defaults, argv)
    if cfg.get("resume"):
        saved_path = Path(cfg["resume"]) / "config.json"
        if not (Path(cfg["resume"]) / "last.pt").is_file() or not saved_path.is_file():
            raise SystemExit(f"error: {cfg['resume']}: no last.pt and config.json to resume from; "
                             "pass the logs/<run> folder of an earlier run")
        try:
            saved = json.loads(saved_path.read_text())["config"]
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"error: {saved_path}: not a config.json written by training; "
                             "start a new run instead") from None
        given = {arg.removeprefix("--").partition("=")[0] for arg in argv}
        # Defaults for names added since, the saved run, then what this command line says.
        cfg = {**defaults, **{k: v for k, v in saved.items() if k in defaults},
               **{k: cfg[k] for k in given}}
    check_config(cfg)
    return cfg


def main(namespace, argv=None):
    """Entry point for the trainer files: their globals are the defaults."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text(namespace))
        return 0
    cfg = load_config(namespace, argv)
    try:
        return train(cfg)
    except (ValueError, PretrainedWeightsMissing) as e:  # ProtocolError, CheckpointError, sizes
        print(f"error: {e}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------ distributed set-up

def setup_distributed(device_name):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def broadcast(values, device):
    """Rank 0's floats to every rank, so that all ranks stop and schedule together."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.broadcast(t, 0)
    return t.tolist()


# ------------------------------------------------------------------ schedule and budget

def lr_factor(cfg, progress, step, steps_per_epoch):
    """Multiplier of the base lr at a step. progress runs 0 -> 1 over the run (steps or time
    budget, whichever is further on), so a cosine schedule ends at zero when the budget does."""
    warm = min(1.0, (step + 1) / (cfg["warmup_epochs"] * steps_per_epoch)) \
        if cfg["warmup_epochs"] else 1.0
    if not cfg["lr_scheduler_on"]:
        return warm
    if cfg["cos"]:  # lr_cycles > 1: warm restarts, each cycle ending at zero
        cycle = min(1.0, progress) * cfg["lr_cycles"]
        within = 1.0 if cycle >= cfg["lr_cycles"] else cycle - math.floor(cycle)
        return warm * 0.5 * (1 + math.cos(math.pi * within))
    return warm * cfg["gamma"] ** (step // steps_per_epoch // cfg["step_size"])


class Budget:
    """The run's length in steps and, optionally, wall-clock minutes. progress() drives the
    learning-rate schedule; expired() ends the run, never before its first step here, so
    that a run always ends with something to evaluate."""

    def __init__(self, max_minutes, total_steps, minutes_done=0.0, step=0):
        self.seconds = max_minutes * 60 if max_minutes else None
        self.total_steps = max(1, total_steps)
        self.start = time.time() - minutes_done * 60
        self.first_step = step

    def minutes(self):
        return (time.time() - self.start) / 60

    def progress(self, step):
        spent = self.minutes() * 60 / self.seconds if self.seconds else 0.0
        return max(step / self.total_steps, spent)

    def expired(self, step):
        return self.seconds is not None and step > self.first_step and \
            self.minutes() * 60 > self.seconds


# ------------------------------------------------------------------ building a run

class LossModel(torch.nn.Module):
    """The network plus the loss and whatever it owns (ArcFace's class centres), so that DDP
    syncs every gradient through one forward call."""

    def __init__(self, net, cfg, n_classes):
        super().__init__()
        self.net = net
        self.loss = losses.build_loss(cfg, net.backbone.out_dim, n_classes)

    def forward(self, x1, x2, y):
        return self.loss(self.net, x1, x2, y)


def run_folder(cfg):
    """A bare run_name goes under logs/; one with a folder in it is a path as given."""
    name = cfg["run_name"] or f"{cfg['model']}-{cfg['loss']}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg["resume"]) if cfg["resume"] else \
        Path(name) if ("/" in name or Path(name).is_absolute()) else Path("logs") / name
    if not cfg["resume"] and (run_dir / "last.pt").exists():
        raise SystemExit(f"error: {run_dir} already holds a run; continue it with "
                         f"--resume={run_dir} or choose another --run_name")
    return run_dir


def build_data(cfg):
    """The identity-disjoint split, training labels, the image bank and the augmentation,
    plus the settings of the crops in data_dir (None: whole photos or unrecorded crops)."""
    crop = faces.read_crop_settings(cfg["data_dir"])
    split = ds.make_split(cfg["data_dir"], cfg["protocol_dir"], cfg["split"], cfg["seed"],
                          cfg["val_fraction"], cfg["val_pairs"], slice_of_data=cfg["slice_of_data"],
                          fold=cfg["fold"], with_test=False)
    people = split["train"]
    # Every image of the validation people, not only the pairs': the operating points score
    # every pair among them.
    val_paths = {p for a, b, _ in split["val_pairs"] for p in (a, b)} | \
        {p for v in split["val"].values() for p in v}
    bank = ds.ImageBank([p for v in people.values() for p in v] + list(val_paths),
                        cfg["image_size"], cache=cfg["cache_images"])
    return SimpleNamespace(split=split, people=people, val_pairs=split["val_pairs"], bank=bank,
                           val_people=split["val"],
                           labels={n: i for i, n in enumerate(sorted(people))}, crop=crop,
                           n_train_images=len(bank.paths) - len(val_paths),
                           transform=ds.keep if cfg["batch_augment"] else
                           ds.train_transform(cfg["image_size"], cfg["augment_p"], cfg["erase_p"]))


def build_model_and_optimizer(cfg, n_classes, device):
    """(net, loss model, EMA or None, optimizer, grad scaler)."""
    net = build_model(ModelConfig.from_dict(cfg), pretrained=cfg["pretrained"]).to(device)
    if cfg["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    model = LossModel(net, cfg, n_classes).to(device)
    if cfg["torch_compile"]:
        # The training step only (validation embeds faster eager here); in place, so the
        # state_dict keys stay the plain ones. Where compiling fails (no C++ compiler, say),
        # torch falls back to eager for the failing part instead of stopping the run.
        torch._dynamo.config.suppress_errors = True
        model.compile(dynamic=False)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]), use_buffers=True) \
        if cfg["ema"] else None
    params = param_groups(model, net.backbone, cfg)
    optimizer = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"]) \
        if cfg["optimizer"] == "adam" else \
        torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True,
                        weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler(device.type,
                                  enabled=cfg["mixed_precision"] and device.type == "cuda")
    return net, model, ema, optimizer, scaler


def param_groups(model, backbone, cfg):
    """The optimizer's parameter groups: what came from outside weights
    (backbone.pretrained_parameters()) at pretrained_lr x lr, everything else (the new layers
    and the loss's own parameters, ArcFace's centres) at lr. Frozen parameters are left out.
    Each group keeps its multiplier as lr_scale, which the schedule keeps (set_lr);
    the base-lr group comes first, so param_groups[0]['lr'] is the lr that the records show.
    pretrained_lr=1: one group, as before there was a choice."""
    scale = cfg["pretrained_lr"]
    if scale < 0:
        raise ValueError(f"pretrained_lr={scale} must be at least 0")
    outside = {id(p) for p in backbone.pretrained_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    old = [p for p in trainable if id(p) in outside]
    if scale == 1.0 or not old:
        return [{"params": trainable, "lr": cfg["lr"], "lr_scale": 1.0}]
    return [{"params": [p for p in trainable if id(p) not in outside], "lr": cfg["lr"],
             "lr_scale": 1.0},
            {"params": old, "lr": cfg["lr"] * scale, "lr_scale": scale}]


def set_lr(optimizer, lr):
    """The schedule's lr for this step: each group at lr x its own lr_scale (param_groups),
    so that every group follows the schedule in proportion."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def pair_images(cfg, data, seed):
    n = cfg["pairs_per_epoch"] or 2 * sum(len(v) for v in data.people.values())
    return ds.PairDataset(ds.sample_pairs(data.people, n, seed), data.bank, data.transform)


def labelled_images(data, paths):
    return ds.ImageDataset(paths, [data.labels[p.parent.name] for p in paths], data.bank,
                           data.transform)


def people_loader(cfg, data, seed, rank, world, common):
    """P people x K images batches; batch_size is global, as for the other kinds: each rank
    takes its share of people."""
    batches = ds.identity_batches(data.people, max(cfg["per_person"] * 2,
                                                   cfg["batch_size"] // world),
                                  cfg["per_person"], seed)
    batches = batches[:len(batches) // world * world]
    images = labelled_images(data, [p for b in batches for p in b])
    size = len(batches[0]) if batches else 1
    blocks = [list(range(i * size, (i + 1) * size)) for i in range(rank, len(batches), world)]
    return DataLoader(images, batch_sampler=blocks, **common)


def order_seed(cfg):
    """The seed of initialisation and data order: seed's own, unless member_seed asks for
    another on the same people split (member_seed=0 draws exactly what seed alone did)."""
    return cfg["seed"] + 1_000_003 * cfg["member_seed"]


def epoch_loader(cfg, data, epoch, rank, world):
    """This epoch's data, re-drawn from the seed, of the kind the loss declares
    (losses.BATCHES): random pairs, P x K people batches, or every image with its identity."""
    seed, kind = order_seed(cfg) * 1000 + epoch, losses.LOSSES[cfg["loss"]].batches
    common = dict(num_workers=cfg["num_workers"], persistent_workers=False,
                  generator=torch.Generator().manual_seed(seed))
    if kind == "people":
        return people_loader(cfg, data, seed, rank, world, common)
    images = pair_images(cfg, data, seed) if kind == "pairs" else \
        labelled_images(data, [p for n in sorted(data.people) for p in data.people[n]])
    sampler = DistributedSampler(images, num_replicas=world, rank=rank, shuffle=True,
                                 seed=order_seed(cfg), drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(images, batch_size=cfg["batch_size"] // world, sampler=sampler,
                      drop_last=True, **common)


def unpack(batch, loss):
    """(x1, x2, y) of a batch: x2 is None but for pair batches."""
    if losses.LOSSES[loss].batches == "pairs":
        return batch
    x, y = batch
    return x, None, y


# ------------------------------------------------------------------ validation

def validation_config(ckpt, defaults, device, data_dir=None, protocol_dir=None):
    """A checkpoint's training settings over the trainer's defaults, as validate reads them,
    on the data and protocol folders given (None: the run's own), for a net built from
    trained ones (ensemble.py, fit_metric.py): its parts embed in their own precision, so
    none is set."""
    cfg = {**defaults, **ckpt.get("config", {}), "mixed_precision": False,
           "cache_images": False, "device": device.type}
    cfg["data_dir"] = data_dir or cfg["data_dir"]
    cfg["protocol_dir"] = protocol_dir or cfg["protocol_dir"]
    return cfg


@torch.no_grad()
def validate(net, cfg, data, device):
    """Metrics on validation pairs, scored as evaluate.py scores (model.score_pairs), the
    run's own loss on the validation people, and the operating points at each false-accept
    rate from every pair of the validation people's images (embedded in the same pass).
    validation_loss needs no trained parameter of the loss (validation people have no ArcFace
    centres), so one is built from cfg, under fork_rng: its unused centres' initialisation
    must not move the training run's random stream, or a run's later epochs would depend on
    how often it validates."""
    net.eval()
    val_images = [p for name in sorted(data.val_people) for p in data.val_people[name]]
    out = score_pairs(net, data.val_pairs,
                      lambda paths: torch.stack([data.bank[p] for p in paths]),
                      cfg["batch_size"], device, amp=cfg["mixed_precision"], also=val_images)
    s = out["scores"]
    y = np.array([label for _, _, label in data.val_pairs], dtype=int)
    names = {name: i for i, name in enumerate(sorted({p.parent.name for p in out["paths"]}))}
    ids = torch.tensor([names[p.parent.name] for p in out["paths"]], dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        loss = losses.build_loss(cfg, out["embeddings"].shape[1], 1)
    value = loss.validation_loss(torch.from_numpy(s), out["embeddings"].float(), out["a"],
                                 out["b"], torch.from_numpy(y), ids)
    threshold = metrics.best_threshold(s, y)
    row = metrics.threshold_metrics(s, y, threshold)
    row.update(auc=metrics.roc_auc(s, y), loss=float(value),
               operating_points=validation_points(net, out, val_images, threshold, device))
    net.train()
    return row


def validation_points(net, out, val_images, threshold, device):
    """operating_points.record of every pair of the validation people's images, with the
    false-accept rate of the accuracy-optimal threshold."""
    index = {p: i for i, p in enumerate(out["paths"])}
    emb = out["embeddings"][[index[p] for p in val_images]].to(device)
    ids = [p.parent.name for p in val_images]
    pairs = op.embedding_pairs(net.score_matrix, net.prepare_gallery(emb), emb, ids,
                               thresholds=(threshold,))
    return op.record(pairs, len(val_images), len(set(ids)), threshold)


# ------------------------------------------------------------------ checkpoints and records

def eval_net(run):
    return run.ema.module if run.ema is not None else run.net


def checkpoint(run, row):
    """What a best_*.pt or snapshot holds: the weights that were evaluated, how to rebuild
    the network and its input faces, and what it was validated at."""
    cfg = run.cfg
    return {"model": {k: v.detach().cpu() for k, v in eval_net(run).state_dict().items()},
            "model_config": ModelConfig.from_dict(cfg).to_dict(), "crop": run.data.crop,
            "config": cfg, "epoch": run.state["epoch"], "step": run.state["step"],
            "metrics": row, "threshold": row["threshold"],
            "operating_points": row["operating_points"],
            "train_people": sorted(run.data.people) + list(run.data.split["val_people"]),
            "val_people": list(run.data.split["val_people"]),
            "git_commit": run.commit}


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)


def save_checkpoint(ckpt, run_dir, names):
    """Save once, then link the other names to it (as timm's CheckpointSaver copies): one
    torch.save however many metrics improved. Each name is replaced atomically."""
    first = run_dir / names[0]
    write_atomic(first, write=lambda tmp: torch.save(ckpt, tmp))
    for name in names[1:]:
        write_atomic(run_dir / name, write=lambda tmp: link_or_copy(first, tmp))


def save_last(run):
    """last.pt: everything a resumed run needs, written before this epoch's records."""
    write_atomic(run.run_dir / "last.pt", write=lambda tmp: torch.save(
        {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
         "scaler": run.scaler.state_dict(), "ema": run.ema.state_dict() if run.ema else {},
         "state": run.state, "rng": {"torch": torch.get_rng_state(),
                                     "python": list(random.getstate())}}, tmp))
    run.saved_epoch = run.state["epoch"]


def read_rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if k not in ("epoch", "step") else int(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def write_rows(path, rows):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    write_atomic(path, write=write)


def plot_curves(rows, path):
    """Loss on two axes (training loss starts ~25, validation ~0.2) and validation metrics."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", color="C0", label="train loss")
    ax1.set_xlabel("epoch"), ax1.set_ylabel("train loss", color="C0"), ax1.set_title("loss")
    right = ax1.twinx()
    right.plot(epochs, [r["loss"] for r in rows], "o-", color="C1", label="validation loss")
    right.set_ylabel("validation loss", color="C1")
    for key in ("accuracy", "auc", "f1"):
        ax2.plot(epochs, [r[key] for r in rows], "o-", label=f"validation {key}")
    ax2.set_xlabel("epoch"), ax2.set_title("validation metrics"), ax2.legend()
    fig.tight_layout()
    write_atomic(path, write=lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_records(run, pending):
    """An evaluated epoch's records: its metrics.csv row, TensorBoard scalars, the best_*.pt
    of the metrics it improved and curves.png. Idempotent, so that a resumed run can redo it
    after a kill cut it short: rows of this epoch or later are replaced."""
    row = pending["row"]
    rows = [r for r in read_rows(run.run_dir / "metrics.csv") if r["epoch"] < row["epoch"]]
    write_rows(run.run_dir / "metrics.csv", rows + [row])
    for key in METRICS + ("train_loss", "lr", "images_per_s"):
        run.writer.add_scalar(key if key in ("train_loss", "lr", "images_per_s")
                              else f"val/{key}", row[key], row["step"])
    run.writer.flush()
    if pending["improved"]:
        save_checkpoint(checkpoint(run, row), run.run_dir,
                        [f"best_{name}.pt" for name in pending["improved"]])
    plot_curves(rows + [row], run.run_dir / "curves.png")


# ------------------------------------------------------------------ restoring a run

def read_last(run_dir, device):
    """last.pt, read before any data is decoded, so that a damaged one fails at once."""
    return read_torch_file(run_dir / "last.pt", "start a new run with another --run_name (a "
                           "killed run's last.pt is never half-written, so it was damaged since)",
                           device)


def restore(run, last):
    """Load last.pt into the run; one clear line if it does not fit."""
    try:
        run.model.load_state_dict(last["model"])
        run.optimizer.load_state_dict(last["optimizer"])
        run.scaler.load_state_dict(last["scaler"])
        if run.ema is not None:
            run.ema.load_state_dict(last["ema"])
        torch.set_rng_state(last["rng"]["torch"].cpu())  # map_location may have moved it
        version, internal, gauss = last["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        run.state = last["state"]
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{run.run_dir / 'last.pt'}: does not fit this run's settings "
                              f"({type(e).__name__}); resume with the settings it was made "
                              "with, or start a new run") from None
    run.saved_epoch = run.state["epoch"]
    if run.world > 1:  # only rank 0's RNG was saved; give every rank its own stream again
        seed_everything(order_seed(run.cfg) + run.rank + 7919 * run.state["epoch"])


def reconcile_records(run):
    """Make the records match last.pt: drop rows a killed run wrote past it, and redo the
    records of its last evaluation if the kill cut them short."""
    path = run.run_dir / "metrics.csv"
    rows = read_rows(path)
    if any(r["epoch"] > run.state["epoch"] for r in rows):
        write_rows(path, [r for r in rows if r["epoch"] <= run.state["epoch"]])
    if run.state.get("pending"):
        write_records(run, run.state["pending"])


def open_run(cfg):
    """Everything a run needs, in one namespace: data, model, optimizer, state, writer."""
    rank, world, device = setup_distributed(cfg["device"])
    # Threads: as asked, else the free cores shared out between the local processes.
    threads = set_threads(cfg["threads"] or max(1, free_cores() // world))
    seed_everything(order_seed(cfg) + rank)
    run = SimpleNamespace(cfg=cfg, rank=rank, world=world, device=device, main=rank == 0,
                          run_dir=run_folder(cfg), threads=threads, commit=git_commit(),
                          saved_epoch=0, writer=None,
                          state={"epoch": 0, "step": 0, "minutes": 0.0, "best": {},
                                 "bad_evals": 0, "pending": None, "cut_short": False})
    last = read_last(run.run_dir, device) if cfg["resume"] else None
    run.data = build_data(cfg)
    run.net, run.model, run.ema, run.optimizer, run.scaler = \
        build_model_and_optimizer(cfg, len(run.data.labels), device)
    run.model.loss.check_data(cfg, run.data)
    if last is not None:
        restore(run, last)
    run.ddp = torch.nn.parallel.DistributedDataParallel(run.model) if world > 1 else run.model
    run.steps_per_epoch = len(epoch_loader(cfg, run.data, 0, rank, world))
    if run.steps_per_epoch == 0:
        raise ds.ProtocolError(f"{cfg['data_dir']}: {run.data.n_train_images} training images "
                               f"give no full batch of {cfg['batch_size']}; lower --batch_size "
                               "or use more data (slice_of_data)")
    if run.main:
        start_records(run)
    return run


def start_records(run):
    """config.json, the TensorBoard writer (a resumed run purges the events a kill left past
    last.pt) and the records of a cut-short evaluation; then one line saying what runs."""
    from torch.utils.tensorboard import SummaryWriter
    cfg, data = run.cfg, run.data
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run.run_dir / "config.json", json.dumps(
        {"config": cfg, "crop": data.crop, "git_commit": run.commit, "torch": torch.__version__,
         "world_size": run.world, "threads": run.threads, "device": str(run.device),
         "train_people": len(data.people), "train_images": data.n_train_images,
         "val_people": len(data.split["val_people"]), "val_pairs": len(data.val_pairs)},
        indent=2))
    if data.split["test_pairs"] is not None:  # a random split's people exist only in this run
        pairs.write_csv(run.run_dir / TEST_PAIRS, data.split["test_pairs"], root=cfg["data_dir"])
    run.writer = SummaryWriter(run.run_dir, purge_step=run.state["step"] if cfg["resume"] else None)
    if cfg["resume"]:
        reconcile_records(run)
    faces_note = f"{data.crop['mode']} face crops" if data.crop else \
        f"no {faces.SETTINGS_FILE} in data_dir (whole photos or unrecorded crops: verify.py " \
        "and the demo will refuse this model)"
    print(f"run {run.run_dir}: {cfg['model']}/{cfg['loss']}/{cfg['distance']} on "
          f"{len(data.people)} people ({data.n_train_images} images, {faces_note}), "
          f"{len(data.val_pairs)} validation pairs from {len(data.split['val_people'])} other "
          f"people; device={run.device} x{run.world}, threads={run.threads}")


# ------------------------------------------------------------------ one epoch

def train_one_epoch(run, budget, snapshots):
    """Train until the epoch's data or the budget runs out. Returns (step_losses, images seen,
    whether the budget ended it)."""
    cfg, state = run.cfg, run.state
    loader = epoch_loader(cfg, run.data, state["epoch"], run.rank, run.world)
    bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{cfg['epochs']}",
               disable=not run.main, leave=False, unit="batch")
    step_losses, seen = [], 0
    for batch in bar:
        progress, out_of_time = broadcast([budget.progress(state["step"]),
                                           float(budget.expired(state["step"]))], run.device)
        if out_of_time:
            return step_losses, seen, True
        set_lr(run.optimizer, cfg["lr"] * lr_factor(cfg, progress, state["step"],
                                                    run.steps_per_epoch))
        loss, images = train_step(run, batch)
        state["step"] += 1
        if run.main and snapshots and budget.minutes() >= snapshots[0]:
            save_snapshot(run, budget, snapshots.pop(0))
        step_losses.append(loss.item())
        seen += images * run.world
        bar.set_postfix(loss=f"{np.mean(step_losses[-20:]):.4f}",
                        lr=f"{run.optimizer.param_groups[0]['lr']:.1e}")
    return step_losses, seen, False


def train_step(run, batch, times=None):
    """One optimisation step: the batch to the device, batch augmentation, forward, backward,
    the optimizer and the EMA. Returns (loss, images). times: a dict each part's milliseconds
    are added to, for benchmark.py --profile, which so times exactly the step training runs."""
    cfg, last = run.cfg, [time.perf_counter()]

    def done(part):
        if times is not None:
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times[part] = times.get(part, 0.0) + (now - last[0]) * 1000
            last[0] = now
    x1, x2, y = (t.to(run.device, non_blocking=True) if t is not None else None
                 for t in unpack(batch, cfg["loss"]))
    done("data")
    if cfg["batch_augment"]:  # uint8 batches, augmented here in a few tensor operations
        x1, x2 = (ds.augment_batch(x, cfg["image_size"], cfg["augment_p"], erase_p=cfg["erase_p"])
                  if x is not None else None for x in (x1, x2))
    if cfg["channels_last"]:
        x1 = x1.contiguous(memory_format=torch.channels_last)
    done("augment")
    with autocast(cfg["mixed_precision"], run.device):
        loss = run.ddp(x1, x2, y)
    done("forward")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    done("backward")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update_parameters(run.net)
    done("optimizer")
    return loss, len(x1) * (2 if x2 is not None else 1)


def save_snapshot(run, budget, minutes):
    """snapshot_<m>min.pt: where a time-budgeted run's accuracy curve is going."""
    row = validate(eval_net(run), run.cfg, run.data, run.device)
    run.state["minutes"] = budget.minutes()
    path = run.run_dir / f"snapshot_{minutes:g}min.pt"
    ckpt = checkpoint(run, row)
    write_atomic(path, write=lambda tmp: torch.save(ckpt, tmp))


# ------------------------------------------------------------------ end of an epoch

def improved(name, value, best):
    return best is None or (value < best if name == "loss" else value > best)


def evaluate_epoch(run, step_losses, images_per_s):
    """Validate, update the bests and the early-stopping count; returns the pending records."""
    cfg, state = run.cfg, run.state
    if not np.isfinite(step_losses).all():  # else sklearn fails on NaN scores, naming nothing
        raise SystemExit(f"error: training diverged: the loss became {np.mean(step_losses)} in "
                         f"epoch {state['epoch']}; lower --lr (now {cfg['lr']:g}) or use "
                         f"another loss; {run.run_dir}/best_*.pt of earlier epochs are kept")
    row = validate(eval_net(run), cfg, run.data, run.device)
    row.update(epoch=state["epoch"], step=state["step"], minutes=state["minutes"],
               lr=run.optimizer.param_groups[0]["lr"], train_loss=float(np.mean(step_losses)),
               images_per_s=images_per_s)
    better = [name for name in METRICS if improved(name, row[name], state["best"].get(name))]
    state["best"].update({name: row[name] for name in better})
    state["bad_evals"] = 0 if cfg["early_stopping_metric"] in better else state["bad_evals"] + 1
    tqdm.write(f"epoch {state['epoch']:3d} | {state['minutes']:5.1f} min | train loss "
               f"{row['train_loss']:.4f} | val loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
               f"auc {row['auc']:.4f} f1 {row['f1']:.4f} | lr {row['lr']:.2e} | "
               f"{images_per_s:.0f} img/s")
    return {"row": row, "improved": better}


def end_epoch(run, budget, step_losses, images_per_s, steps, cut_short):
    """Close an epoch. An epoch the budget cut short counts as one (a resumed run starts the
    next with fresh data); one the budget ended before its first step does not. Evaluate when
    due, save last.pt, then write the records from it. Returns (stop early, evaluated)."""
    cfg, state = run.cfg, run.state
    state["epoch"] += 1 if steps else 0
    state["cut_short"] = cut_short and steps > 0
    state["minutes"] = budget.minutes()
    due = state["epoch"] % cfg["calc_metrics_interval"] == 0 or \
        state["epoch"] == cfg["epochs"] or cut_short
    state["pending"] = evaluate_epoch(run, step_losses, images_per_s) \
        if run.main and step_losses and due else None
    stop = float(run.main and state["bad_evals"] >= cfg["patience"])
    if run.main:
        save_last(run)
        if state["pending"]:
            write_records(run, state["pending"])
    return broadcast([stop], run.device)[0] > 0, bool(step_losses and due)


# ------------------------------------------------------------------ the run

def train(cfg):
    run = open_run(cfg)
    state = run.state
    budget = Budget(cfg["max_minutes"], run.steps_per_epoch * cfg["epochs"], state["minutes"],
                    state["step"])
    snapshots = sorted(float(x) for x in str(cfg["snapshot_minutes"]).split(",") if x.strip())
    snapshots = [x for x in snapshots if x > state["minutes"]]
    step_losses, seen, t0, stopped = [], 0, time.time(), False
    run.model.train()
    try:
        while state["epoch"] < cfg["epochs"] and not stopped:
            epoch_losses, epoch_seen, cut_short = train_one_epoch(run, budget, snapshots)
            step_losses, seen = step_losses + epoch_losses, seen + epoch_seen
            stopped, evaluated = end_epoch(run, budget, step_losses, seen / (time.time() - t0),
                                           len(epoch_losses), cut_short)
            stopped |= cut_short
            if evaluated:
                step_losses, seen, t0 = [], 0, time.time()
    except KeyboardInterrupt:
        if run.main:
            held = f"{run.run_dir}/last.pt holds the end of epoch {run.saved_epoch}. Continue " \
                f"with --resume={run.run_dir}" if run.saved_epoch else \
                "no epoch had ended, so there is nothing to resume"
            print(f"\ninterrupted in epoch {run.saved_epoch + 1}; {held}", file=sys.stderr)
        return 130
    finally:
        if run.writer is not None:
            run.writer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if run.main:
        print_finish(run)
    return 0


def print_finish(run):
    state, cfg = run.state, run.cfg
    why = f"time budget spent; epoch {state['epoch']} was cut short and counts as an epoch, " \
        "so a resumed run starts the next one" if state["cut_short"] else \
        "time budget spent" if cfg["max_minutes"] and state["minutes"] >= cfg["max_minutes"] else \
        "early stop" if state["epoch"] < cfg["epochs"] else "all epochs done"
    print(f"finished ({why}) after {state['epoch']} epochs, {state['minutes']:.1f} min. "
          f"Best validation: " + ", ".join(f"{k} {v:.4f}" for k, v in state["best"].items())
          + f". Checkpoints in {run.run_dir}/")
