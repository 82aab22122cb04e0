"""What `benchmark.py --profile` measures: where a training step's time goes, how many
floating-point operations it does (torch's FlopCounterMode), and what share of the machine's
own matmul peak, taken in the same run, that makes. Nothing here writes a file.
"""
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import dataset as ds
from model import ModelConfig, build_model, embed_images
from runtime import autocast, pick_device, seed_everything, set_threads
from training import (build_data, build_model_and_optimizer, epoch_loader, load_config,
                      train_step, validate)

PARTS = ("data", "augment", "forward", "backward", "optimizer")


def matmul_peak(dtype, n=2048, repeats=10):
    """GFLOP/s of the fastest of REPEATS n x n matmuls in DTYPE on the CPU, at the threads
    set now: the ceiling a training step's achieved FLOP/s is read against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # the first call pays for the kernel's setup
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def machine_peak(threads):
    set_threads(threads)
    return {"threads": threads, "n": 2048,
            "gflops_per_s": {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}}


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                        transposed, _output_padding, _groups, output_mask, out_shape=None):
    """A convolution's backward: each of the input's and the weight's gradients does the
    forward's multiply-adds. torch's own formula counts a grouped convolution's weight
    gradient as if it were dense, `groups` times too many: 9 GFLOP a step for
    EfficientNet-Lite0's depthwise layers instead of 0.6, above the machine's peak."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * \
        (bool(output_mask[0]) + bool(output_mask[1]))


def count_flops():
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: conv_backward_flops})


def step_flops(cfg, data, device, batch):
    """Floating-point operations of one training step (forward, backward and optimizer) of the
    recipe's network on BATCH, counted eager: FlopCounterMode sees aten calls, which a compiled
    step hides. Frozen layers' skipped backward is not counted, since it does not run."""
    run = SimpleNamespace(cfg={**cfg, "torch_compile": False}, device=device)
    run.net, run.ddp, run.ema, run.optimizer, run.scaler = \
        build_model_and_optimizer(run.cfg, len(data.labels), device)
    run.ddp.train()
    with count_flops() as counter:
        _, images = train_step(run, batch)
    return counter.get_total_flops(), images


def timed_steps(run, data, steps, warmup):
    """Milliseconds per step of each part, the images per step, the warm-up seconds, and one
    batch to count FLOPs on."""
    cfg, parts = run.cfg, dict.fromkeys(PARTS, 0.0)

    def clock():
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    loader, done, images, first = iter(epoch_loader(cfg, data, 0, 0, 1)), 0, 0, None
    started, warmup_s = clock(), 0.0
    while done < warmup + steps:
        if done == warmup and not warmup_s:  # the first steps compile, when torch_compile is on
            warmup_s = clock() - started
        t0 = clock()
        batch = next(loader, None)
        if batch is None:
            loader = iter(epoch_loader(cfg, data, done, 0, 1))
            continue
        first = first or batch
        fetch_ms, times = (clock() - t0) * 1000, {}
        _, n = train_step(run, batch, times)
        if done >= warmup:  # the DataLoader's fetch counts as data, with the copy to the device
            times["data"] += fetch_ms
            for key in parts:
                parts[key] += times[key] / steps
            images += n
        done += 1
    return parts, images / steps, warmup_s, first


def profile(namespace, argv, steps=20, warmup=3):
    """Time the parts of a training step of the trainer's recipe (its defaults, then argv):
    the DataLoader with its per-image transforms, the batch augmentation, forward, backward,
    the optimizer step, and one validation; count the step's FLOPs. Returns milliseconds per
    step for each part, the images per second of the whole step and its achieved GFLOP/s."""
    cfg = {**load_config(namespace, argv), "resume": ""}
    device = pick_device(cfg["device"])
    threads = set_threads(cfg["threads"] or None)
    seed_everything(cfg["seed"])
    data = build_data(cfg)
    run = SimpleNamespace(cfg=cfg, device=device)
    run.net, run.ddp, run.ema, run.optimizer, run.scaler = \
        build_model_and_optimizer(cfg, len(data.labels), device)
    run.ddp.train()
    parts, per_step, warmup_s, batch = timed_steps(run, data, steps, warmup)
    t0 = time.perf_counter()
    validate(run.net, cfg, data, device)
    validation_s = time.perf_counter() - t0
    flops, counted = step_flops(cfg, data, device, batch)
    step_ms = sum(parts.values())
    return {"ms_per_step": parts, "step_ms": step_ms, "images_per_s": per_step / step_ms * 1000,
            "gflop_per_image": flops / counted / 1e9,
            "gflops_per_s": flops / counted * per_step / step_ms / 1e6,
            "validation_s": validation_s, "val_pairs": len(data.val_pairs),
            "warmup_s": warmup_s, "warmup_steps": warmup, "model": cfg["model"],
            "image_size": cfg["image_size"], "mixed_precision": bool(cfg["mixed_precision"]),
            "batch_size": cfg["batch_size"], "threads": threads, "device": str(device),
            "steps": steps}


def profile_embedding(namespace, argv, n_images=2048):
    """Embedding throughput of the trainer's network on validation images, eager against
    torch.compile (its compile time counted apart; eager only with torch_compile off), in the
    run's mixed precision."""
    cfg = load_config(namespace, argv)
    device = pick_device(cfg["device"])
    set_threads(cfg["threads"] or None)
    data = build_data({**cfg, "cache_images": False})
    paths = sorted({p for a, b, _ in data.val_pairs for p in (a, b)})[:n_images]
    images = torch.stack([data.bank[p] for p in paths])
    net = build_model(ModelConfig.from_dict(cfg)).to(device).eval()
    out, compile_s = {}, 0.0
    for name in ("eager", "compiled") if cfg["torch_compile"] else ("eager",):
        if name == "compiled":
            t0 = time.perf_counter()
            net.backbone.compile(dynamic=False)
            with autocast(cfg["mixed_precision"], device):  # the first calls compile
                embed_images(net, images[:cfg["batch_size"]], ds.eval_transform(),
                             cfg["batch_size"], device)
                if len(images) % cfg["batch_size"]:
                    embed_images(net, images[:len(images) % cfg["batch_size"]],
                                 ds.eval_transform(), cfg["batch_size"], device)
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with autocast(cfg["mixed_precision"], device):
            embed_images(net, images, ds.eval_transform(), cfg["batch_size"], device)
        out[name] = len(images) / (time.perf_counter() - t0)
    return {"images_per_s": out, "compile_s": compile_s, "images": len(images)}
