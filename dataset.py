"""LFW identities, protocol files, identity-disjoint splits, pair sampling and torch datasets.

A pair is (image_a, image_b, label) with paths and label 1 for "same person". Positive pairs
never pair an image with itself (the old project's did, 43% of the time), so people with a
single image give no positives. Every split keeps training and test people apart.
"""
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

import faces

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, for every backbone


class ProtocolError(ValueError):
    """A missing or malformed protocol file or image folder; the message names file and fix."""


# ---------------------------------------------------------------- identities and protocol files

def scan_people(folder, suffixes=IMAGE_SUFFIXES):
    """{person: [image paths, sorted]} of folder/<person>/<image>: the one rule for what
    counts as a person's photo, shared by training, the crop, identify.py and the demo.
    Hidden files and folders are skipped (.ipynb_checkpoints/ is not a person, macOS's ._x.jpg
    is not a photo), person folders that are links are followed, only `suffixes` count,
    and a folder without a photo is no person. Files directly in folder are not photos."""
    people = {}
    for d in sorted(Path(folder).iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        photos = sorted(p for p in d.iterdir() if not p.name.startswith(".")
                        and p.suffix.lower() in suffixes and p.is_file())
        if photos:
            people[d.name] = photos
    return people


def read_identities(image_dir):
    """scan_people of a training folder, or ProtocolError naming the fix."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ProtocolError(f"{image_dir}: no such folder; run `python download_data.py` "
                            "(and `python crop_dataset_to_faces.py` for cropped_dataset)")
    people = scan_people(image_dir)
    if not people:
        raise ProtocolError(f"{image_dir}: no <person>/<image>.jpg files in it; run "
                            "`python download_data.py` or point data_dir at the right folder")
    return people


def image_path(image_dir, name, number):
    """LFW's file naming: <name>/<name>_0004.jpg."""
    return Path(image_dir) / name / f"{name}_{int(number):04d}.jpg"


def _lines(path):
    path = Path(path)
    if not path.is_file():
        raise ProtocolError(f"{path}: missing; run `python download_data.py` to fetch the "
                            "protocol files")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data[:e.start].count(b"\n") + 1
        raise ProtocolError(f"{path}:{lineno}: not UTF-8 text (byte {data[e.start]:#04x}); the "
                            "file is damaged or not an LFW protocol file, re-fetch it with "
                            "`python download_data.py --force`") from None
    lines = [(i + 1, line.split()) for i, line in enumerate(text.splitlines())]
    lines = [(n, f) for n, f in lines if f]
    if not lines:
        raise ProtocolError(f"{path}: empty; run `python download_data.py --force`")
    return lines


def _bad(path, lineno, what):
    return ProtocolError(f"{path}:{lineno}: {what}; the file is malformed, re-fetch it with "
                         "`python download_data.py --force`")


def _int(path, lineno, text):
    if not text.isdigit() or int(text) < 1:
        raise _bad(path, lineno, f"expected a positive whole number, got {text!r}")
    return int(text)


def parse_pairs(path):
    """Read pairs.txt (View 2) or pairsDevTrain/DevTest.txt (View 1).

    Returns a list of (name_a, number_a, name_b, number_b, same, fold). The header is
    'folds  n' (View 2) or just 'n' (one set); each fold holds n matched lines
    'name  i  j' then n mismatched lines 'name_a  i  name_b  j'.
    """
    lines = _lines(path)
    lineno, header = lines[0]
    if len(header) == 1:
        folds, per_class = 1, _int(path, lineno, header[0])
    elif len(header) == 2:
        folds, per_class = _int(path, lineno, header[0]), _int(path, lineno, header[1])
    else:
        raise _bad(path, lineno, f"header should be 'n' or 'folds n', got {' '.join(header)!r}")
    body = lines[1:]
    if len(body) != folds * 2 * per_class:
        raise ProtocolError(f"{path}: the header promises {folds} x 2 x {per_class} = "
                            f"{folds * 2 * per_class} pairs but the file has {len(body)}; it is "
                            "truncated or malformed, re-fetch it with `python download_data.py --force`")
    pairs = []
    for k, (lineno, f) in enumerate(body):
        fold, same = k // (2 * per_class), (k % (2 * per_class)) < per_class
        if same and len(f) == 3:
            pairs.append((f[0], _int(path, lineno, f[1]), f[0], _int(path, lineno, f[2]), 1, fold))
        elif not same and len(f) == 4:
            pairs.append((f[0], _int(path, lineno, f[1]), f[2], _int(path, lineno, f[3]), 0, fold))
        else:
            want = "'name i j' (a matched pair)" if same else "'name_a i name_b j' (a mismatched pair)"
            raise _bad(path, lineno, f"expected {want}, got {' '.join(f)!r}")
    return pairs


def parse_people(path):
    """Read people.txt (header: number of folds; each fold: a count, then 'name n' lines) or
    peopleDevTrain/DevTest.txt (header: a count). Returns a list of folds of {name: n}."""
    lines = _lines(path)
    first = lines[0][1]
    if len(first) != 1:
        raise _bad(path, lines[0][0], f"header should be one number, got {' '.join(first)!r}")
    single = len(lines) - 1 == int(first[0]) if first[0].isdigit() else False
    n_folds = 1 if single else _int(path, lines[0][0], first[0])
    folds, i = [], 0 if single else 1
    for _ in range(n_folds):
        if i >= len(lines):
            raise ProtocolError(f"{path}: ends after {len(folds)} of {n_folds} folds; re-fetch it "
                                "with `python download_data.py --force`")
        lineno, f = lines[i]
        if len(f) != 1:
            raise _bad(path, lineno, f"expected a fold size, got {' '.join(f)!r}")
        count, fold = _int(path, lineno, f[0]), {}
        for lineno, f in lines[i + 1:i + 1 + count]:
            if len(f) != 2:
                raise _bad(path, lineno, f"expected 'name n', got {' '.join(f)!r}")
            fold[f[0]] = _int(path, lineno, f[1])
        if len(fold) != count:
            raise ProtocolError(f"{path}: a fold promises {count} people but has {len(fold)}; "
                                "re-fetch it with `python download_data.py --force`")
        folds.append(fold)
        i += 1 + count
    if i != len(lines):
        raise _bad(path, lines[i][0], "unexpected extra lines after the last fold")
    return folds


def pairs_to_paths(pairs, image_dir):
    """Protocol pairs -> [(path_a, path_b, label)] under image_dir."""
    return [(image_path(image_dir, a, i), image_path(image_dir, b, j), same)
            for a, i, b, j, same, _ in pairs]


def pair_people(pairs):
    return {p[0] for p in pairs} | {p[2] for p in pairs}


# ---------------------------------------------------------------- sampling and splits

def sample_pairs(people, n_pairs, seed):
    """n_pairs balanced random pairs from {person: [images]}: half same-person pairs of two
    distinct images, half pairs of two different people. Deterministic for a seed."""
    rng = random.Random(seed)
    names = sorted(people)
    multi = [n for n in names if len(people[n]) >= 2]
    if not multi or len(names) < 2:
        raise ProtocolError("too few people to sample pairs: need at least one person with two "
                            "images and two people in all; use more data (slice_of_data)")
    pairs = []
    for _ in range(n_pairs // 2):
        a, b = rng.sample(people[rng.choice(multi)], 2)  # two distinct images: never a self-pair
        pairs.append((a, b, 1))
        p, q = rng.sample(names, 2)
        pairs.append((rng.choice(people[p]), rng.choice(people[q]), 0))
    return pairs


def split_people(names, fraction, seed):
    """A seeded split of people into (kept, held_out)."""
    names = sorted(names)
    held = set(random.Random(seed).sample(names, round(len(names) * fraction)))
    return [n for n in names if n not in held], sorted(held)


def subset(people, names):
    return {n: people[n] for n in names if n in people}


def make_split(image_dir, protocol_dir, split="view1", seed=0, val_fraction=0.1,
               val_pairs=1000, test_fraction=0.2, slice_of_data=0, fold=0, with_test=True):
    """Identity-disjoint training people, validation pairs and test pairs.

    split='view1': train on peopleDevTrain.txt (or, without it, everyone absent from
    pairsDevTest.txt), test on pairsDevTest.txt. split='view2': train on the nine people.txt
    folds other than `fold`, test on that fold of pairs.txt. split='random': a seeded split
    of people, with fixed sampled test pairs. Validation pairs come from a seeded share of the
    training people, so model selection never sees a test pair. slice_of_data > 0 keeps that
    many training people, chosen at random with the seed. with_test=False leaves the View 1
    and View 2 test pairs unread (test_pairs None): training never looks at them, so it needs
    no test protocol file (View 1: pairsDevTest.txt, unless peopleDevTrain.txt is missing).
    """
    people = read_identities(image_dir)
    protocol_dir = Path(protocol_dir)
    test = None
    if split == "view1":
        if with_test:
            test = pairs_to_paths(parse_pairs(protocol_dir / "pairsDevTest.txt"), image_dir)
        if (protocol_dir / "peopleDevTrain.txt").is_file():
            train_names = set(parse_people(protocol_dir / "peopleDevTrain.txt")[0])
        else:
            test_names = pair_people(parse_pairs(protocol_dir / "pairsDevTest.txt"))
            train_names = set(people) - test_names
    elif split == "view2":
        folds = parse_people(protocol_dir / "people.txt")
        if not 0 <= fold < len(folds):
            raise ProtocolError(f"{protocol_dir / 'people.txt'}: has folds 0-{len(folds) - 1}, "
                                f"not {fold}; pass --fold in that range")
        train_names = set().union(*(f for k, f in enumerate(folds) if k != fold))
        if with_test:
            test = pairs_to_paths([p for p in parse_pairs(protocol_dir / "pairs.txt")
                                   if p[5] == fold], image_dir)
    elif split == "random":
        train_list, test_list = split_people(people, test_fraction, seed)
        train_names = set(train_list)
        test = sample_pairs(subset(people, test_list), val_pairs, seed + 1)
    else:
        raise ProtocolError(f"unknown split {split!r}: use view1, view2 or random")
    train_names = sorted(train_names & set(people))
    if slice_of_data:
        train_names = sorted(random.Random(seed).sample(train_names, min(slice_of_data,
                                                                         len(train_names))))
    fit_names, val_names = split_people(train_names, val_fraction, seed)
    val = sample_pairs(subset(people, val_names), val_pairs, seed + 2)
    return {"train": subset(people, fit_names), "val_pairs": val, "test_pairs": test,
            "val_people": val_names, "val": subset(people, val_names)}


# ---------------------------------------------------------------- images, transforms, datasets

def fit(img, size):
    """Resize the short side to size and centre-crop a square: how every image, in training,
    evaluation or a demo, reaches the network's input size."""
    if size and tuple(img.shape[1:]) != (size, size):
        img = v2.functional.center_crop(v2.functional.resize(img, size, antialias=True), size)
    return img


def load_image(path, size=None):
    """Decode to uint8 (3, H, W) with the project's one decoder, fitted to size if given. A
    file that cannot be read is a ProtocolError that names it and says how to fix it."""
    try:
        return fit(faces.read_image(path), size)
    except faces.FaceError as e:
        raise ProtocolError(f"{e}. Delete it, or re-crop the folder with `python "
                            "crop_dataset_to_faces.py --overwrite`") from None


def decode_all(paths, size, desc="decode"):
    """Decode every image once into one uint8 tensor (N, 3, size, size). One storage, so
    forked DataLoader workers share it instead of decoding JPEGs every epoch."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, p in enumerate(tqdm(paths, desc=desc, unit="img", leave=False)):
        out[i] = load_image(p, size)
    return out


def train_transform(image_size, augment_p=0.5, erase_p=0.0):
    """Flips always; with probability augment_p a random affine crop and a colour jitter; with
    probability erase_p one random rectangle set to the mean colour (random erasing)."""
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomResizedCrop(image_size, scale=(0.7, 1.0), ratio=(0.9, 1.1),
                                             antialias=True)], p=augment_p),
        v2.RandomApply([v2.ColorJitter(0.3, 0.3, 0.3)], p=augment_p),  # no hue: 3x slower
        v2.RandomGrayscale(p=0.1 * augment_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
        v2.RandomErasing(p=erase_p, scale=ERASE_SCALE, ratio=ERASE_RATIO),
    ])


def eval_transform():
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


# Batched augmentation: the same distribution as train_transform, drawn per image, applied to
# a whole uint8 batch in a few tensor operations on the training device (no per-image Python).
CROP_SCALE, CROP_RATIO, JITTER = (0.7, 1.0), (0.9, 1.1), 0.3


# Random erasing's rectangle: 2-20% of the face, aspect 0.3-3.3; at these ranges it always fits,
# so RandomErasing's first try is its draw.
ERASE_SCALE, ERASE_RATIO = (0.02, 0.2), (0.3, 3.3)


def augment_params(n, augment_p=0.5, flip_p=0.5, generator=None, device="cpu", erase_p=0.0):
    """Each image's random draw, as train_transform draws it: flip, crop box (width, height
    and centre as fractions of the image), colour factors (1 = unchanged) in a random order,
    greyscale, and the erased rectangle (its size and top-left corner, as fractions)."""
    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=device)

    one = torch.ones(n, device=device)
    # RandomResizedCrop's draw: up to 10 tries of (area, aspect), the first box that fits;
    # at these ranges some always fits, else the whole image.
    area = u(n, 10, lo=CROP_SCALE[0], hi=CROP_SCALE[1])
    ratio = u(n, 10, lo=math.log(CROP_RATIO[0]), hi=math.log(CROP_RATIO[1])).exp()
    w_try, h_try = (area * ratio).sqrt(), (area / ratio).sqrt()
    fits = (w_try <= 1) & (h_try <= 1)
    first = fits.int().argmax(1, keepdim=True)
    crop = (u(n) < augment_p) & fits.any(1)
    w = torch.where(crop, w_try.gather(1, first)[:, 0], one)
    h = torch.where(crop, h_try.gather(1, first)[:, 0], one)
    jitter = u(n) < augment_p
    factors = [torch.where(jitter, u(n, lo=1 - JITTER, hi=1 + JITTER), one) for _ in range(3)]
    e_area = u(n, lo=ERASE_SCALE[0], hi=ERASE_SCALE[1])
    e_ratio = u(n, lo=math.log(ERASE_RATIO[0]), hi=math.log(ERASE_RATIO[1])).exp()
    ew, eh = (e_area * e_ratio).sqrt(), (e_area / e_ratio).sqrt()
    erase = {"erase": u(n) < erase_p, "ew": ew, "eh": eh, "ex": u(n) * (1 - ew),
             "ey": u(n) * (1 - eh)}
    return {**erase, "flip": u(n) < flip_p, "w": w, "h": h, "cx": w / 2 + u(n) * (1 - w),
            "cy": h / 2 + u(n) * (1 - h), "brightness": factors[0], "contrast": factors[1],
            "saturation": factors[2], "order": u(n, 3).argsort(1), "grey": u(n) < 0.1 * augment_p}


def grey(x):
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def augment_batch(images, size, augment_p=0.5, flip_p=0.5, generator=None, erase_p=0.0):
    """train_transform for a uint8 batch (N, 3, H, W) at once, on its own device, each image
    with its own draw; normalised floats (N, 3, size, size) out. With every probability 0 it
    is exactly eval_transform."""
    params = augment_params(len(images), augment_p, flip_p, generator, images.device, erase_p)
    return apply_augment(images, params, size)


def apply_augment(images, p, size):
    """Flip and resized crop as one batch of affine grids, colour jitter by broadcasting, then
    greyscale, normalisation and erasing."""
    n, device = len(images), images.device
    x = images.float().mul_(1 / 255)
    if p["flip"].any() or (p["w"] < 1).any() or (p["h"] < 1).any() or x.shape[-1] != size:
        # The crop box as a sampling grid, built by broadcasting (no rotation, so no matmul):
        # output pixel centres in [-1, 1], scaled by the box and mirrored where flipped.
        base = (torch.arange(size, device=device) * 2 + 1) / size - 1
        sign = 1 - 2 * p["flip"].float()
        grid = torch.empty(n, size, size, 2, device=device)
        grid[..., 0] = (sign * p["w"]).view(n, 1, 1) * base.view(1, 1, size) \
            + (2 * p["cx"] - 1).view(n, 1, 1)
        grid[..., 1] = p["h"].view(n, 1, 1) * base.view(1, size, 1) + (2 * p["cy"] - 1).view(n, 1, 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Each colour change is x -> a*x + b*mean(grey(x)) + c*grey(x) with per-image a, b, c
    # (brightness: f, 0, 0; contrast: f, 1-f, 0; saturation: f, 0, 1-f), so one pass a change
    # applies all three in each image's own order, clamped after each as torchvision does.
    f = torch.stack([p["brightness"], p["contrast"], p["saturation"]], 1)  # (n, 3)
    for step in range(3):
        op = p["order"][:, step]
        a = f.gather(1, op[:, None])[:, 0]
        b = torch.where(op == 1, 1 - a, torch.zeros_like(a)).view(n, 1, 1, 1)
        c = torch.where(op == 2, 1 - a, torch.zeros_like(a)).view(n, 1, 1, 1)
        g = grey(x)
        x.mul_(a.view(n, 1, 1, 1)).add_(b * g.mean((2, 3), keepdim=True))
        x.addcmul_(c, g).clamp_(0, 1)
    if p["grey"].any():
        chosen = p["grey"].nonzero()[:, 0]
        x[chosen] = grey(x[chosen]).expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    x.sub_(mean).div_(torch.tensor(STD, device=device).view(1, 3, 1, 1))
    if p["erase"].any():  # 0 after normalisation is the mean colour, as RandomErasing's value=0
        at = (torch.arange(size, device=device) + 0.5) / size
        cols = (at.view(1, -1) >= p["ex"].view(n, 1)) & (at.view(1, -1) < (p["ex"] + p["ew"]).view(n, 1))
        rows = (at.view(1, -1) >= p["ey"].view(n, 1)) & (at.view(1, -1) < (p["ey"] + p["eh"]).view(n, 1))
        inside = rows[:, :, None] & cols[:, None, :] & p["erase"].view(n, 1, 1)
        x.masked_fill_(inside[:, None], 0.0)
    return x


class ImageBank:
    """Images by path, decoded once into memory (cache=True) or read on demand."""

    def __init__(self, paths, size, cache=True):
        self.paths = sorted(set(map(Path, paths)))
        self.index = {p: i for i, p in enumerate(self.paths)}
        self.size = size
        self.images = decode_all(self.paths, size) if cache else None

    def __getitem__(self, path):
        i = self.index[Path(path)]
        return self.images[i] if self.images is not None else load_image(path, self.size)


class PairDataset(Dataset):
    """(image_a, image_b, label) for a list of path pairs."""

    def __init__(self, pairs, bank, transform):
        self.pairs, self.bank, self.transform = pairs, bank, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        a, b, label = self.pairs[i]
        return (self.transform(self.bank[a]), self.transform(self.bank[b]),
                torch.tensor(label, dtype=torch.float32))


def keep(image):
    """No per-image transform: the uint8 image goes to augment_batch whole."""
    return image


class ImageDataset(Dataset):
    """(image, label) for single images, labels being identity numbers (or anything)."""

    def __init__(self, paths, labels, bank, transform):
        self.paths, self.labels, self.bank, self.transform = paths, labels, bank, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(self.bank[self.paths[i]]), self.labels[i]


def identity_batches(people, batch_size, per_person, seed):
    """Batches of P people x K images (K=per_person) for batch-hard triplet mining. Only people
    with at least two images take part; a person with fewer than K images repeats some."""
    rng = random.Random(seed)
    names = [n for n in sorted(people) if len(people[n]) >= 2]
    rng.shuffle(names)
    p = max(2, batch_size // per_person)
    batches = []
    for s in range(0, len(names) - p + 1, p):
        batch = []
        for n in names[s:s + p]:
            imgs = people[n]
            batch += rng.sample(imgs, per_person) if len(imgs) >= per_person else \
                rng.choices(imgs, k=per_person)
        batches.append(batch)
    return batches
