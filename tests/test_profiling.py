"""benchmark.py --profile: a step's FLOPs counted by torch, the machine's matmul peak, and the
tables that read them against each other."""
import json

import torch
import pytest

import benchmark
import profiling
import trainer2
import trainer_pretrained
from conftest import tiny_args


def test_matmul_peak_counts_two_flops_per_multiply_add(monkeypatch):
    """A matmul that takes 1 s reads as 2 n^3 / 1e9 GFLOP/s: the convention peaks are quoted in."""
    clock = iter([0.0, 1.0] * 20)
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    assert profiling.matmul_peak(torch.float32, n=64, repeats=3) == pytest.approx(2 * 64 ** 3 / 1e9)


@pytest.mark.parametrize("groups", [1, 8])
def test_a_convolutions_backward_is_two_forwards_even_when_grouped(groups):
    """Input and weight gradients each do the forward's multiply-adds. torch's own formula
    counts a grouped (depthwise) weight gradient `groups` times over; ours does not."""
    from torch.utils.flop_counter import FlopCounterMode
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x)
    forward = counter.get_total_flops()
    assert forward == 2 * 4 * 16 * 16 * 8 * (8 // groups) * 9
    with profiling.count_flops() as counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == 3 * forward


def test_a_step_counts_forward_and_backward_and_freezing_removes_backward(synthetic_lfw,
                                                                          tmp_path):
    """The step's FLOPs are about three forwards (backward takes two: input and weight
    gradients); freezing the stem and first stages removes their backward, and so FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    from training import build_data, load_config
    cfg = {**load_config(vars(trainer2), tiny_args(synthetic_lfw, tmp_path / "r")), "resume": ""}
    data = build_data(cfg)
    x = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    batch = (x, torch.arange(16) % len(data.labels))
    step, images = profiling.step_flops(cfg, data, torch.device("cpu"), batch)
    assert images == 16
    from model import ModelConfig, build_model
    net = build_model(ModelConfig.from_dict(cfg)).eval()
    with FlopCounterMode(display=False) as counter:
        net.embed(x.float() / 255)
    forward = counter.get_total_flops()
    assert 2.5 * forward < step < 3.3 * forward

    args = tiny_args(synthetic_lfw, tmp_path / "p", image_size=64, mixed_precision=False)
    full = {**load_config(vars(trainer_pretrained), args + ["--freeze_stages=0"]), "resume": ""}
    frozen = {**full, "freeze_stages": 3}
    data = build_data(full)
    x = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    batch = (x, torch.arange(4) % len(data.labels))
    cpu = torch.device("cpu")
    assert profiling.step_flops(frozen, data, cpu, batch)[0] < \
        0.9 * profiling.step_flops(full, data, cpu, batch)[0]


def test_profile_recipes_alternates_paths_and_reports_flops_against_the_peak(synthetic_lfw,
                                                                             monkeypatch,
                                                                             tmp_path):
    monkeypatch.setattr(benchmark, "PROFILES", {"best": {"slow": ["--batch_augment=False"],
                                                         "fast": []}})
    monkeypatch.setattr(profiling, "machine_peak", lambda threads: {
        "threads": threads, "n": 2048, "gflops_per_s": {"bf16": 300.0, "fp32": 150.0}})
    train_args = " ".join(a for a in tiny_args(synthetic_lfw, tmp_path / "r")
                          if not a.startswith(("--data_dir", "--protocol_dir", "--run_name")))
    args = benchmark.parse_args(["--profile", "--profile-steps", "2", "--crops",
                                 str(synthetic_lfw / "images"), "--data-root",
                                 str(synthetic_lfw), "--train-args", train_args])
    calls = []
    real = profiling.profile
    monkeypatch.setattr(profiling, "profile", lambda ns, argv, steps: calls.append(argv)
                        or real(ns, argv, steps=steps))
    monkeypatch.setitem(benchmark.RECIPES, "plain", {**benchmark.RECIPES["best"],
                                                     "train": ["--width=8"]})
    result = benchmark.profile_recipes(args, ["best", "plain"], rounds=2)
    # best's two paths in alternated rounds; plain, with no PROFILES entry, once as it is
    assert ["--batch_augment=False" in argv for argv in calls] == [True, False, True, False, False]
    best = result["recipes"]["best"]
    assert best["rounds"] == 2 and best["ratio"] == pytest.approx(
        best["paths"]["fast"]["images_per_s"] / best["paths"]["slow"]["images_per_s"])
    assert result["recipes"]["plain"]["ratio"] is None
    for path in best["paths"].values():
        assert path["gflop_per_image"] > 0
        assert path["gflops_per_s"] == pytest.approx(path["gflop_per_image"] * path["images_per_s"])
    gflops, share, dtype = benchmark.utilisation(best["paths"]["fast"], result["peak"])
    assert dtype == "bf16" and share == pytest.approx(gflops / 300.0)
    json.dumps(result)  # profile.json
    text = benchmark.profile_table(result)
    assert "300 GFLOP/s bf16, 150 fp32" in text and "| part of a `plain` step |" in text
    assert f"{gflops:.0f} ({share:.0%} of bf16)" in text
    assert f"fast against slow: **{best['ratio']:.2f}x**" in text
