"""Device, CPU threads and seeding: the run-time set-up every script shares."""
import os
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch


def pick_device(name="auto"):
    """'auto' means CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: device={name} was asked for but no CUDA GPU is visible; use cpu")
    return torch.device(name)


def free_cores():
    """Cores not already busy. Oversubscribing hurts badly here: MTCNN with 2 threads while
    another process held a core fell from 40 to 1.6 images/s."""
    cores = len(os.sched_getaffinity(0))
    try:  # runnable tasks right now (the load average lags by a minute); we are one of them
        busy = min(int(open("/proc/loadavg").read().split()[3].split("/")[0]) - 1
                   for _ in range(3) if time.sleep(0.05) is None)
    except (OSError, ValueError, IndexError):
        busy = 0
    return max(1, cores - max(0, busy))


def set_threads(n=None):
    """Set torch's intra-op threads (default: the free cores) and return the number used."""
    n = n or free_cores()
    torch.set_num_threads(n)
    return n


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(enabled, device):
    """Mixed precision as training uses it: fp16 on CUDA, bf16 on the CPU (2x faster on CPUs
    with AMX). Evaluation and the demo embed the same way, so that scores match thresholds."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=bool(enabled))


def git_commit():
    """The commit of this checkout, recorded next to every figure ('unknown' outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path, data=None, write=None):
    """Write a file so that a kill at any moment leaves the old file or the new one, never a
    half-written one. Give the content (bytes or str), or write(tmp_path) to produce it. On an
    exception, Ctrl-C included, the temporary file is removed; only a kill -9 can leave one,
    named <name>.tmp, which no reader of this project mistakes for data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if write is not None:
            write(tmp)
        elif isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def error_line(e):
    """An unexpected exception as one line for a script's `error:` output."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no detail'}"
