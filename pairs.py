"""Verification pairs from any source: LFW's protocol files, a plain CSV, insightface's .bin.

A Pair is (path_a, path_b, same, fold): two image paths, a label (1 = same person) and a
fold (an int, or None when the file has none; then 10 class-balanced folds are cut). Its
first three fields are the (path_a, path_b, label) triple the rest of the project indexes.

read_pairs(file) -> (pairs, images). For LFW files and CSVs the paths are image files and
images is None. A .bin holds its images inside it: each image gets a stand-in path
"<file>.bin#<index>" and images maps those paths to its encoded bytes, so the rest of the
code treats them as paths; images_of_for(images, size) decodes either kind.

insightface's .bin (what its eval/verification.py loads; the files users have for LFW,
CFP-FP, AgeDB-30, CALFW, CPLFW) is a pickle of (bins, issame_list): bins[2i] and
bins[2i + 1] are pair i's encoded images, issame_list[i] its label. A pickle can run code
when loaded, so it is read with an unpickler that refuses every global but numpy's array
rebuilders (some converters store issame_list as a numpy array); the real files hold only
bytes, lists and bools. insightface scores them in 10 folds of consecutive pairs, and so
do we.
"""
import csv
import io
import pickle
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

import dataset as ds
import faces
from runtime import write_atomic

CSV_COLUMNS = ("path_a", "path_b", "same", "fold")
CSV_FIX = "each row is path_a,path_b,same[,fold] under that header, same 0 or 1, fold a whole number"
N_FOLDS = 10
BIN_FIX = "re-download it, or rebuild it with pairs.write_bin"

# numpy's array rebuilders (numpy 1 and 2 names): they make arrays, never call anything else.
NUMPY_GLOBALS = {(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
                 for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


class Pair(NamedTuple):
    path_a: Path
    path_b: Path
    same: int
    fold: Optional[int] = None


def read_pairs(path, image_dir=None):
    """(pairs, images) from a .bin, a .csv or an LFW pairs file (by its suffix). image_dir:
    the folder an LFW file's names live in (required there), or the folder a CSV's relative
    paths are relative to (default: the CSV's own folder); a .bin ignores it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return read_bin(path)
    if suffix == ".csv":
        return read_csv(path, image_dir), None
    return read_lfw(path, image_dir), None


def read_lfw(path, image_dir):
    """LFW's pairs.txt (its 10 official folds) or pairsDevTest/DevTrain.txt (one set: fold
    None) as Pairs of files under image_dir."""
    if image_dir is None:
        raise ds.ProtocolError(f"{path}: an LFW pairs file names people, not files; pass the "
                               "<person>/<image>.jpg folder they are in (--data)")
    found = ds.parse_pairs(path)
    one_set = len({p[5] for p in found}) == 1
    return [Pair(ds.image_path(image_dir, a, i), ds.image_path(image_dir, b, j), same,
                 None if one_set else fold) for a, i, b, j, same, fold in found]


# ------------------------------------------------------------------ CSV

def _csv_error(path, lineno, what):
    return ds.ProtocolError(f"{path}:{lineno}: {what}; {CSV_FIX}")


def _csv_rows(path):
    """The header's columns and (line number, row) of a CSV, its encoding and header checked."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # Excel's CSVs start with a BOM
    except FileNotFoundError:
        raise ds.ProtocolError(f"{path}: no such file; check the --pairs path") from None
    except UnicodeDecodeError as e:
        raise ds.ProtocolError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at "
                               f"offset {e.start}); save it as UTF-8 CSV") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or not any(c.strip() for c in header):
        raise _csv_error(path, 1, "empty file, no header")
    header = [c.strip() for c in header]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    missing = [c for c in CSV_COLUMNS[:3] if c not in header]
    if unknown or missing or len(set(header)) != len(header):
        what = (f"unknown column {unknown[0]!r}" if unknown else
                f"no {missing[0]!r} column" if missing else "a column named twice")
        raise _csv_error(path, 1, f"header {','.join(header)!r} has {what}")
    rows = [(reader.line_num, row) for row in reader if any(f.strip() for f in row)]
    if not rows:
        raise _csv_error(path, 2, "no pairs after the header")
    return header, rows


def read_csv(path, image_dir=None):
    """Pairs of a CSV with header path_a,path_b,same[,fold]. Relative paths are relative to
    image_dir if given, else to the CSV's folder. Every problem is a ProtocolError naming the
    line and the fix."""
    header, rows = _csv_rows(path)
    base = Path(image_dir) if image_dir is not None else Path(path).parent
    pairs = []
    for lineno, row in rows:
        if len(row) != len(header):
            raise _csv_error(path, lineno, f"{len(row)} fields where the header has "
                                           f"{len(header)}")
        f = {c: v.strip() for c, v in zip(header, row)}
        if not f["path_a"] or not f["path_b"]:
            raise _csv_error(path, lineno, "an empty image path")
        if f["same"] not in ("0", "1"):
            raise _csv_error(path, lineno, f"same must be 0 or 1, got {f['same']!r}")
        fold = f.get("fold")
        if fold is not None and not fold.isdigit():
            raise _csv_error(path, lineno, f"fold must be a whole number, got {fold!r}")
        pairs.append(Pair(base / f["path_a"], base / f["path_b"], int(f["same"]),
                          None if fold is None else int(fold)))
    return pairs


def _relative(path, root):
    """path relative to root when under it, else absolute; '/'-separated either way."""
    path = Path(path).absolute()
    try:
        return path.relative_to(Path(root).absolute()).as_posix()
    except ValueError:
        return path.as_posix()


def write_csv(path, pairs, root=None):
    """Write pairs ((path_a, path_b, same[, fold]) each) as a CSV that read_csv reads back,
    atomically. Paths under root (default: the CSV's folder, which read_csv resolves against)
    are written relative to it, the others absolute. Folds are written when every pair has
    one; pairs with and without folds cannot be mixed."""
    folds = [p[3] if len(p) > 3 else None for p in pairs]
    with_folds = any(f is not None for f in folds)
    if with_folds and None in folds:
        raise ValueError("some pairs have a fold and some do not; give every pair one or none")
    root = Path(path).parent if root is None else root
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS if with_folds else CSV_COLUMNS[:3])
    for p, fold in zip(pairs, folds):
        row = [_relative(p[0], root), _relative(p[1], root), int(p[2])]
        w.writerow(row + [int(fold)] if with_folds else row)
    write_atomic(path, out.getvalue())


# ------------------------------------------------------------------ insightface .bin

class Refused(pickle.UnpicklingError):
    """A pickle reached for a global that is not on the allowed list; args[0] names it."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickles data only: every global (the way a pickle reaches code: a function to call,
    a class to build) is refused, except numpy's array rebuilders."""

    def find_class(self, module, name):
        if (module, name) in NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise Refused(f"{module}.{name}")


def load_bin(path):
    """(bins, labels) of a .bin: the encoded images as bytes and the labels as 0/1 ints,
    checked for insightface's layout. Nothing in the file can run."""
    try:
        with open(path, "rb") as f:
            data = SafeUnpickler(f, encoding="bytes").load()  # bytes: Python 2's pickles
    except FileNotFoundError:
        raise ds.ProtocolError(f"{path}: no such file; check the --pairs path") from None
    except Refused as e:
        raise ds.ProtocolError(f"{path}: refused: it holds a {e} object, which could run "
                               "code; a .bin benchmark holds only image bytes and labels") from None
    except Exception as e:  # a damaged pickle raises many types: EOFError, ValueError, ...
        raise ds.ProtocolError(f"{path}: not a readable pickle ({type(e).__name__}); "
                               f"{BIN_FIX}") from None
    return _check_bin(path, data)


def _check_bin(path, data):
    def bad(what):
        return ds.ProtocolError(f"{path}: {what}, not insightface's (image bytes, same/different "
                                f"list) layout; {BIN_FIX}")
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise bad(f"holds a {type(data).__name__}")
    bins, issame = data
    if not isinstance(bins, (list, tuple)) or not all(isinstance(b, (bytes, bytearray))
                                                      for b in bins):
        raise bad("its images are not a list of encoded image bytes")
    try:
        labels = np.asarray(issame)
    except ValueError:  # a ragged list
        raise bad("its labels are not a list of booleans") from None
    if labels.size == 0:
        raise bad("it holds no pairs")
    if labels.ndim != 1 or labels.dtype.kind not in "biu" or not np.isin(labels, (0, 1)).all():
        raise bad("its labels are not a list of booleans")
    if len(bins) != 2 * len(labels):
        raise bad(f"{len(bins)} images for {len(labels)} pairs (want two per pair)")
    return [bytes(b) for b in bins], [int(y) for y in labels]


def consecutive_folds(n, k=N_FOLDS):
    """Fold of each of n pairs as sklearn's KFold(k, shuffle=False) cuts them (insightface's
    protocol): k runs of consecutive pairs, the first n % k one longer."""
    k = min(k, n)
    sizes = [n // k + (f < n % k) for f in range(k)]
    return np.repeat(np.arange(k), sizes).tolist()


def read_bin(path):
    """(pairs, images) of an insightface .bin: pair i is images "<path>#<2i>" and
    "<path>#<2i+1>"; images maps each such Path to its encoded bytes."""
    bins, labels = load_bin(path)
    names = [Path(f"{path}#{i}") for i in range(len(bins))]
    folds = consecutive_folds(len(labels))
    pairs = [Pair(names[2 * i], names[2 * i + 1], y, folds[i]) for i, y in enumerate(labels)]
    return pairs, dict(zip(names, bins))


def write_bin(path, bins, labels):
    """An insightface .bin, atomically: bins the encoded images (two per pair, consecutive),
    labels each pair's same (truthy) or different."""
    if len(bins) != 2 * len(labels):
        raise ValueError(f"{len(bins)} images for {len(labels)} pairs; give two per pair")
    data = ([bytes(b) for b in bins], [bool(y) for y in labels])
    write_atomic(path, pickle.dumps(data, protocol=4))


# ------------------------------------------------------------------ images

def missing_images(pairs, images=None):
    """Sorted paths of the pairs that are neither inside the .bin nor a file on disk."""
    images = images or {}
    return sorted({p for pair in pairs for p in pair[:2]
                   if p not in images and not Path(p).is_file()})


def load_any(path, images, size):
    """One image as uint8 (3, size, size): from the .bin's bytes if it is one of its, else
    the file; via faces.decode and dataset.fit, as training reads its images."""
    if not images or path not in images:
        return ds.load_image(path, size)
    try:
        return ds.fit(faces.decode(images[path], str(path)), size)
    except faces.FaceError as e:
        raise ds.ProtocolError(f"{e} (an image inside the .bin: it is damaged); {BIN_FIX}") from None


def images_of_for(images, size):
    """images_of(paths) -> uint8 (N, 3, size, size), for model.score_pairs: each path decoded
    once, from the .bin's bytes (images, from read_pairs) or from its file."""
    if not images:
        return lambda paths: ds.decode_all(paths, size)

    def images_of(paths):
        out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
        for i, p in enumerate(tqdm(paths, desc="decode", unit="img", leave=False)):
            out[i] = load_any(p, images, size)
        return out
    return images_of


def people_of(pairs, images=None):
    """The people of file-backed pairs (<person>/<image> folders), for contamination checks;
    None for a .bin, whose images carry no names."""
    if images:
        return None
    return {Path(p).parent.name for pair in pairs for p in pair[:2]}
