"""Device, CPU threads and seeding: the run-time set-up every script shares."""
import hashlib
import math
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class DeviceError(ValueError):
    """A device that cannot be used; the message is one line naming it and the fix. Each
    script catches it with its other input errors (exit status 2): a SystemExit here would
    exit with status 1, which verify.py means as "different people"."""


def pick_device(name="auto"):
    """'auto' means CUDA when there is a GPU, else the CPU; DeviceError for a name torch does
    not know or a CUDA device without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name}: not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: asked for, but no CUDA GPU is visible; use cpu")
    return device


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
    """Mixed precision as training uses it: fp16 on CUDA, bf16 on the CPU (faster on CPUs with
    native bf16 arithmetic, such as this machine's AVX-512 BF16; no AMX here). Evaluation and
    the demo embed the same way, so that scores match thresholds."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=bool(enabled))


def git_commit():
    """The commit of this checkout, recorded next to every figure ('unknown' outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _default_mode():
    """The permissions a plain open() would give a new file (mkstemp makes 0600). Linux shows
    the umask in /proc; elsewhere it can only be read by setting it, done once at import."""
    try:
        mask = int(next(line.split()[1] for line in open("/proc/self/status")
                        if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


NEW_FILE_MODE = _default_mode()


def write_atomic(path, data=None, write=None):
    """Write a file so that a kill at any moment leaves the old file or the new one, never a
    half-written one, and so that writers racing on one path each replace it whole (the last
    one wins). Give the content (bytes or str), or write(tmp_path) to produce it at tmp_path,
    a name no other writer uses. Each call writes its own temporary file in the target's
    folder (os.replace is atomic only within one file system), named .<name>.<random>.tmp,
    syncs it to disk, then renames it over PATH. On an exception, Ctrl-C included, the
    temporary file is removed; only a kill -9 can leave one, which no reader of this project
    mistakes for data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if write is None:
                f.write(data.encode() if isinstance(data, str) else data)
        if write is not None:
            # mkstemp reserved a random name; WRITE makes the file itself (os.link, as
            # training.link_or_copy does, cannot link onto an existing file).
            tmp.unlink()
            write(tmp)
        with open(tmp, "rb") as f:  # the data on disk before the rename makes it visible
            os.fsync(f.fileno())
        # Keep the permissions a reader had (or a plain new file's): mkstemp's are 0600.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else NEW_FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path):
    """The SHA-256 of a file's bytes, read in blocks (checkpoints, archives, gallery photos)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_number(value):
    """Whether a value read from JSON is a number (True and False are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class NotFinite(ValueError):
    """A threshold or score that is NaN or infinite; the message names it and the fix."""


def finite(value, where, fix):
    """value as a float, or NotFinite: no verdict comes of NaN (every score is < NaN, so
    every face is unknown), infinity makes every face one way, and JSON cannot hold either."""
    value = float(value)
    if not math.isfinite(value):
        raise NotFinite(f"{where} {value} is not a finite number; {fix}")
    return value


def error_line(e):
    """An unexpected exception as one line for a script's `error:` output."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no detail'}"
