"""The training engine that trainer.py and trainer2.py call: main(globals()).

One readable loop: sample the epoch's data, train, evaluate on validation pairs from
training people, write per-metric checkpoints, stop early or when the time budget is spent.
Runs alone or under `torchrun --nproc_per_node=N` (gloo on CPU, nccl on GPU).
"""
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import dataset as ds
import metrics
from model import (MODEL_KEYS, ArcFace, PretrainedWeightsMissing, batch_hard_triplet_loss,
                   bce_loss, build_model, contrastive_loss, embed_images)
from runtime import autocast, free_cores, git_commit, pick_device, seed_everything, set_threads

METRICS = ("accuracy", "precision", "recall", "f1", "auc", "loss")  # one best_*.pt each
CSV_FIELDS = ("epoch", "step", "minutes", "lr", "train_loss", "loss", "accuracy", "precision",
              "recall", "f1", "auc", "threshold", "images_per_s")


# ------------------------------------------------------------------ hyperparameters

def hyperparameters(namespace):
    """The plain globals of a trainer file: names not starting with '_' holding simple values."""
    return {k: v for k, v in namespace.items() if not k.startswith("_")
            and isinstance(v, (bool, int, float, str, type(None)))}


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
            raise SystemExit(f"error: unknown hyperparameter {name!r}; valid names: "
                             + ", ".join(sorted(config)))
        config[name] = parse_value(name, text, config[name])
    return config


def check_config(cfg):
    choices = {"model": ("koch", "compact", "resnext"),
               "init": ("default", "kaiming", "xavier", "koch"),
               "loss": ("bce", "contrastive", "triplet", "arcface"),
               "distance": ("l1", "cosine"), "optimizer": ("adam", "sgd"),
               "split": ("view1", "view2", "random"), "activation": ("sigmoid", "relu"),
               "early_stopping_metric": METRICS}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"error: {key}={cfg[key]!r} is not one of {', '.join(allowed)}")


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


# ------------------------------------------------------------------ schedule

def lr_factor(cfg, progress, step, steps_per_epoch):
    """Multiplier of the base lr at a step. progress runs 0 -> 1 over the run (steps or time
    budget, whichever is further on), so a cosine schedule ends at zero when the budget does."""
    warm = min(1.0, (step + 1) / (cfg["warmup_epochs"] * steps_per_epoch)) \
        if cfg["warmup_epochs"] else 1.0
    if not cfg["lr_scheduler_on"]:
        return warm
    if cfg["cos"]:
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * cfg["gamma"] ** (step // steps_per_epoch // cfg["step_size"])


# ------------------------------------------------------------------ the model under training

class LossModel(torch.nn.Module):
    """The network plus whatever the loss owns (ArcFace's class centres), so that DDP syncs
    every gradient through one forward call."""

    def __init__(self, net, cfg, n_classes):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.arcface = ArcFace(net.backbone.out_dim, n_classes, cfg["arc_scale"], cfg["margin"]) \
            if cfg["loss"] == "arcface" else None

    def forward(self, x1, x2, y):
        loss = self.cfg["loss"]
        if loss == "bce":
            return bce_loss(self.net(x1, x2), y)
        if loss == "contrastive":
            e1, e2 = self.net(torch.cat([x1, x2])).chunk(2)
            return contrastive_loss(e1, e2, y, self.cfg["distance"], self.cfg["margin"])
        e = self.net(x1)
        if loss == "triplet":
            return batch_hard_triplet_loss(e, y, self.cfg["distance"], self.cfg["margin"])
        return self.arcface(e, y, self.cfg["label_smoothing"])


def epoch_loader(cfg, train, labels, bank, transform, epoch, rank, world):
    """This epoch's data, re-drawn from the seed: random pairs (bce, contrastive), all images
    (arcface) or P people x K images batches (triplet)."""
    seed = cfg["seed"] * 1000 + epoch
    common = dict(num_workers=cfg["num_workers"], persistent_workers=False,
                  generator=torch.Generator().manual_seed(seed))
    if cfg["loss"] in ("bce", "contrastive"):
        n = cfg["pairs_per_epoch"] or 2 * sum(len(v) for v in train.values())
        data = ds.PairDataset(ds.sample_pairs(train, n, seed), bank, transform)
    elif cfg["loss"] == "arcface":
        paths = [p for n in sorted(train) for p in train[n]]
        data = ds.ImageDataset(paths, [labels[p.parent.name] for p in paths], bank, transform)
    else:
        # batch_size is global, as for the other losses: each rank takes its share of people.
        batches = ds.identity_batches(train, max(cfg["per_person"] * 2, cfg["batch_size"] // world),
                                      cfg["per_person"], seed)
        batches = batches[:len(batches) // world * world]
        paths = [p for b in batches for p in b]
        data = ds.ImageDataset(paths, [labels[p.parent.name] for p in paths], bank, transform)
        size = len(batches[0]) if batches else 1
        blocks = [list(range(i * size, (i + 1) * size)) for i in range(rank, len(batches), world)]
        return DataLoader(data, batch_sampler=blocks, **common)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                 seed=cfg["seed"], drop_last=True)
    sampler.set_epoch(epoch)
    return DataLoader(data, batch_size=cfg["batch_size"] // world, sampler=sampler,
                      drop_last=True, **common)


def unpack(batch, loss):
    if loss in ("bce", "contrastive"):
        return batch
    x, y = batch
    return x, None, y


# ------------------------------------------------------------------ validation

@torch.no_grad()
def validate(net, cfg, val_pairs, bank, device):
    """Metrics on validation pairs: each image embedded once, pairs scored from embeddings."""
    net.eval()
    paths = sorted({p for a, b, _ in val_pairs for p in (a, b)})
    index = {p: i for i, p in enumerate(paths)}
    images = torch.stack([bank[p] for p in paths])
    with autocast(cfg["mixed_precision"], device):
        emb = embed_images(net, images, ds.eval_transform(), cfg["batch_size"], device)
    a = torch.tensor([index[p] for p, _, _ in val_pairs])
    b = torch.tensor([index[p] for _, p, _ in val_pairs])
    labels = torch.tensor([y for _, _, y in val_pairs], dtype=torch.float32)
    e1, e2 = emb[a].to(device), emb[b].to(device)
    scores = net.score(e1, e2).float().cpu()
    if cfg["loss"] == "bce":
        loss = bce_loss(scores, labels)
    else:  # embedding losses: the contrastive loss of the pairs, the same geometry pairwise
        loss = contrastive_loss(e1.float(), e2.float(), labels.to(device), cfg["distance"],
                                cfg["margin"])
    s, y = scores.numpy(), labels.numpy().astype(int)
    threshold = metrics.best_threshold(s, y)
    row = metrics.threshold_metrics(s, y, threshold)
    row.update(auc=metrics.roc_auc(s, y), loss=float(loss))
    net.train()
    return row


# ------------------------------------------------------------------ checkpoints and logs

def save_atomic(obj, path):
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def plot_curves(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
    ax1.plot(epochs, [r["loss"] for r in rows], "o-", label="validation loss")
    ax1.set_xlabel("epoch"), ax1.set_title("loss"), ax1.legend()
    for key in ("accuracy", "auc", "f1"):
        ax2.plot(epochs, [r[key] for r in rows], "o-", label=f"validation {key}")
    ax2.set_xlabel("epoch"), ax2.set_title("validation metrics"), ax2.legend()
    fig.tight_layout()
    tmp = path.with_name("tmp-" + path.name)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def read_rows(path):
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (float(v) if k not in ("epoch", "step") else int(v)) for k, v in r.items()}
                for r in csv.DictReader(f)]


def append_row(path, row):
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: row[k] for k in CSV_FIELDS})


def improved(name, value, best):
    return best is None or (value < best if name == "loss" else value > best)


# ------------------------------------------------------------------ the run

def main(namespace, argv=None):
    """Entry point for the trainer files: their globals are the defaults."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = hyperparameters(namespace)
    cfg = apply_overrides(defaults, argv)
    if cfg.get("resume"):
        saved_path = Path(cfg["resume"]) / "config.json"
        if not (Path(cfg["resume"]) / "last.pt").is_file() or not saved_path.is_file():
            raise SystemExit(f"error: {cfg['resume']}: no last.pt and config.json to resume from; "
                             "pass the logs/<run> folder of an earlier run")
        saved = json.loads(saved_path.read_text())["config"]
        given = {arg.removeprefix("--").partition("=")[0] for arg in argv}
        # Defaults for names added since, the saved run, then what this command line says.
        cfg = {**defaults, **saved, **{k: cfg[k] for k in given}}
    check_config(cfg)
    try:
        return train(cfg)
    except (ValueError, PretrainedWeightsMissing) as e:  # ProtocolError, bad sizes or inits
        print(f"error: {e}", file=sys.stderr)
        return 1


def train(cfg):
    rank, world, device = setup_distributed(cfg["device"])
    main_rank = rank == 0
    # Threads: as asked, else the free cores shared out between the local processes.
    threads = set_threads(cfg["threads"] or max(1, free_cores() // world))
    seed_everything(cfg["seed"] + rank)
    # A bare run_name goes under logs/; one with a folder in it is a path as given.
    name = cfg["run_name"] or f"{cfg['model']}-{cfg['loss']}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg["resume"]) if cfg["resume"] else \
        Path(name) if ("/" in name or Path(name).is_absolute()) else Path("logs") / name
    if not cfg["resume"] and (run_dir / "last.pt").exists():
        raise SystemExit(f"error: {run_dir} already holds a run; continue it with "
                         f"--resume={run_dir} or choose another --run_name")

    split = ds.make_split(cfg["data_dir"], cfg["protocol_dir"], cfg["split"], cfg["seed"],
                          cfg["val_fraction"], cfg["val_pairs"], slice_of_data=cfg["slice_of_data"],
                          fold=cfg["fold"])
    train_people = split["train"]
    labels = {n: i for i, n in enumerate(sorted(train_people))}
    val_paths = {p for a, b, _ in split["val_pairs"] for p in (a, b)}
    bank = ds.ImageBank([p for v in train_people.values() for p in v] + list(val_paths),
                        cfg["image_size"], cache=cfg["cache_images"])
    transform = ds.train_transform(cfg["image_size"], cfg["augment_p"])

    net = build_model(cfg).to(device)
    if cfg["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    model = LossModel(net, cfg, len(labels)).to(device)
    ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]), use_buffers=True) \
        if cfg["ema"] else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"]) \
        if cfg["optimizer"] == "adam" else \
        torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True,
                        weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["mixed_precision"] and device.type == "cuda")
    state = {"epoch": 0, "step": 0, "minutes": 0.0, "best": {}, "bad_evals": 0}
    if cfg["resume"]:
        last = torch.load(run_dir / "last.pt", map_location=device, weights_only=True)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scaler.load_state_dict(last["scaler"])
        if ema is not None:
            ema.load_state_dict(last["ema"])
        state = last["state"]
        torch.set_rng_state(last["rng"]["torch"].cpu())  # map_location may have moved it
        version, internal, gauss = last["rng"]["python"]
        random.setstate((version, tuple(internal), gauss))
        if world > 1:  # only rank 0's RNG was saved; give every rank its own stream again
            seed_everything(cfg["seed"] + rank + 7919 * state["epoch"])
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(
            {"config": cfg, "git_commit": git_commit(), "torch": torch.__version__,
             "world_size": world, "threads": threads, "device": str(device),
             "train_people": len(train_people), "train_images": len(bank.paths) - len(val_paths),
             "val_people": len(split["val_people"]), "val_pairs": len(split["val_pairs"])},
            indent=2))
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(run_dir)
        print(f"run {run_dir}: {cfg['model']}/{cfg['loss']}/{cfg['distance']} on "
              f"{len(train_people)} people ({len(bank.paths) - len(val_paths)} images), "
              f"{len(split['val_pairs'])} validation pairs from {len(split['val_people'])} other "
              f"people; device={device} x{world}, threads={threads}")

    def checkpoint(row):
        eval_net = ema.module if ema is not None else net
        return {"model": {k: v.detach().cpu() for k, v in eval_net.state_dict().items()},
                "model_config": {k: cfg[k] for k in MODEL_KEYS},
                "config": cfg, "epoch": state["epoch"], "step": state["step"], "metrics": row,
                "threshold": row["threshold"],
                "train_people": sorted(train_people) + list(split["val_people"]),
                "git_commit": git_commit()}

    def evaluate_and_save(train_loss, images_per_s):
        """Validation metrics, csv/TensorBoard rows, best_*.pt; returns whether to stop."""
        stop = 0.0
        if main_rank:
            row = validate(ema.module if ema is not None else net, cfg, split["val_pairs"],
                           bank, device)
            row.update(epoch=state["epoch"], step=state["step"], minutes=state["minutes"],
                       lr=optimizer.param_groups[0]["lr"], train_loss=train_loss,
                       images_per_s=images_per_s)
            append_row(run_dir / "metrics.csv", row)
            for key in METRICS + ("train_loss", "lr", "images_per_s"):
                writer.add_scalar(key if key in ("train_loss", "lr", "images_per_s")
                                  else f"val/{key}", row[key], state["step"])
            ckpt = None
            for name in METRICS:
                if improved(name, row[name], state["best"].get(name)):
                    state["best"][name] = row[name]
                    ckpt = ckpt or checkpoint(row)
                    save_atomic(ckpt, run_dir / f"best_{name}.pt")
                    if name == cfg["early_stopping_metric"]:
                        state["bad_evals"] = -1
            state["bad_evals"] += 1
            plot_curves(read_rows(run_dir / "metrics.csv"), run_dir / "curves.png")
            tqdm.write(f"epoch {state['epoch']:3d} | {state['minutes']:5.1f} min | train loss "
                       f"{train_loss:.4f} | val loss {row['loss']:.4f} acc {row['accuracy']:.4f} "
                       f"auc {row['auc']:.4f} f1 {row['f1']:.4f} | lr {row['lr']:.2e} | "
                       f"{images_per_s:.0f} img/s")
            stop = float(state["bad_evals"] >= cfg["patience"])
        return broadcast([stop], device)[0] > 0

    def save_last():
        if main_rank:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(),
                         "ema": ema.state_dict() if ema is not None else {},
                         "state": state, "rng": {"torch": torch.get_rng_state(),
                                                 "python": list(random.getstate())}},
                        run_dir / "last.pt")

    budget = cfg["max_minutes"] * 60 if cfg["max_minutes"] else None
    # Snapshots at fixed minutes show where a time-budgeted run's accuracy curve is going.
    snapshots = sorted(float(x) for x in str(cfg["snapshot_minutes"]).split(",") if x.strip())
    snapshots = [x for x in snapshots if x > state["minutes"]]
    steps_per_epoch = len(epoch_loader(cfg, train_people, labels, bank, transform, 0, rank, world))
    if steps_per_epoch == 0:
        raise ds.ProtocolError(f"{cfg['data_dir']}: {len(bank.paths) - len(val_paths)} training "
                               f"images give no full batch of {cfg['batch_size']}; lower "
                               "--batch_size or use more data (slice_of_data)")
    total_steps = max(1, steps_per_epoch * cfg["epochs"])
    start = time.time() - state["minutes"] * 60
    stopped = False
    losses, seen, t0 = [], 0, time.time()  # since the last evaluation
    first_step = state["step"]  # the budget is checked only after a step, so a run always
    model.train()               # ends with something to evaluate
    try:
        while state["epoch"] < cfg["epochs"] and not stopped:
            loader = epoch_loader(cfg, train_people, labels, bank, transform, state["epoch"],
                                  rank, world)
            bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{cfg['epochs']}",
                       disable=not main_rank, leave=False, unit="batch")
            for batch in bar:
                progress, out_of_time = broadcast([
                    max(state["step"] / total_steps,
                        (time.time() - start) / budget if budget else 0.0),
                    float(budget is not None and state["step"] > first_step
                          and time.time() - start > budget)], device)
                if out_of_time:
                    stopped = True
                    break
                for g in optimizer.param_groups:
                    g["lr"] = cfg["lr"] * lr_factor(cfg, progress, state["step"], steps_per_epoch)
                x1, x2, y = (t.to(device, non_blocking=True) if t is not None else None
                             for t in unpack(batch, cfg["loss"]))
                if cfg["channels_last"]:
                    x1 = x1.contiguous(memory_format=torch.channels_last)
                with autocast(cfg["mixed_precision"], device):
                    loss = ddp(x1, x2, y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update_parameters(net)
                state["step"] += 1
                if main_rank and snapshots and time.time() - start >= snapshots[0] * 60:
                    row = validate(ema.module if ema is not None else net, cfg,
                                   split["val_pairs"], bank, device)
                    state["minutes"] = (time.time() - start) / 60
                    save_atomic(checkpoint(row), run_dir / f"snapshot_{snapshots.pop(0):g}min.pt")
                losses.append(loss.item())
                seen += len(x1) * (2 if x2 is not None else 1) * world
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            state["epoch"] += 1
            state["minutes"] = (time.time() - start) / 60
            last_epoch = state["epoch"] == cfg["epochs"] or stopped
            if losses and (state["epoch"] % cfg["calc_metrics_interval"] == 0 or last_epoch):
                stopped |= evaluate_and_save(float(np.mean(losses)), seen / (time.time() - t0))
                losses, seen, t0 = [], 0, time.time()
            save_last()
    except KeyboardInterrupt:
        if main_rank:
            print(f"\ninterrupted in epoch {state['epoch'] + 1}; {run_dir}/last.pt holds the end "
                  f"of epoch {state['epoch']}. Continue with --resume={run_dir}", file=sys.stderr)
        return 130
    finally:
        if main_rank:
            writer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if main_rank:
        why = "time budget spent" if budget and state["minutes"] * 60 >= budget else \
            "early stop" if state["epoch"] < cfg["epochs"] else "all epochs done"
        print(f"finished ({why}) after {state['epoch']} epochs, {state['minutes']:.1f} min. "
              f"Best validation: " + ", ".join(f"{k} {v:.4f}" for k, v in state["best"].items())
              + f". Checkpoints in {run_dir}/")
    return 0
