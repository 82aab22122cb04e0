"""Who, among the people I know, is in this photo? 1:N identification against a gallery.

    python identify.py GALLERY QUERY... [--checkpoint PATH] [--top 5] [--far 1e-3 |
        --threshold T] [--json] [--device auto|cpu|cuda]

GALLERY is a folder of <person>/<photo>.jpg (jpeg, png, gif, webp) files: one folder per
person, named after them, with one or more photos each, read by dataset.scan_people's rule
(hidden files and folders skipped). The checkpoint is loaded as an inference.FaceModel,
which finds, embeds and scores every face, as in verify.py. Each gallery photo gives one
face, its most prominent, built with the checkpoint's crop settings as verify.py builds an
upload's (FaceModel.faces; same-sized photos are detected in batches capped by bytes,
see detection_batches); a photo without a face, or one that cannot be read (a damaged
file), is skipped with a warning saying why. The same photo (the same content) under two
people is kept under the first of them by folder name and skipped, with a warning naming
both files, under the others: one photo cannot be two people, and keeping it twice would
tie them on every query. Every face of each QUERY photo is answered, with its box: the
--top people of the gallery by score, and "unknown" when the best score is below the
threshold, chosen as verify.py chooses it (--threshold, else --far's stored threshold, else
the checkpoint's accuracy-optimal one), so that "known" means what "same person" means
there. The FAR is per compared photo: the output also says how likely a stranger is to match
someone in a gallery of this size (stranger_chance).

A person with several photos is matched by the best of them (the highest score over that
person's photos): see person_scores.

The gallery's embeddings are cached beside it, in GALLERY/.identify-cache-<checkpoint>.pt,
keyed by each file's content (SHA-256) and the checkpoint: a later run embeds only new or
changed photos, and removed ones drop out. Photos without a face are recorded too, so they
are not searched again. A cache whose embeddings do not fit the checkpoint (another shape,
NaN, infinite or all-zero rows) is rebuilt, with a warning. Search is one matrix product
over the gallery's embeddings.

In the text output, control characters in names and paths (a newline in a folder's name)
are printed as escapes (\\n), so each line stays one line; --json keeps them exactly, as
JSON escapes. --json never prints NaN: a score that is not a finite number is null there.

Without --checkpoint, the newest logs/<run>/best_accuracy.pt is used, or with no run of your
own the model shipped in models/ (said on the first line).
Exit status: 0 every query photo answered (a photo without a face is answered "no face
found"); 2 an error, usage and input errors included (one line on stderr naming the file
and the fix).
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dataset as ds
import faces
import model as m
import operating_points as op
from inference import FaceModel, source_text
from runtime import (DeviceError, NotFinite, error_line, finite, pick_device, set_threads,
                     sha256_file, write_atomic)

CACHE_VERSION = 1
CACHE_PREFIX = ".identify-cache-"
BATCH = 64              # gallery faces embedded per call
# Gallery photos wait for MTCNN, grouped by size, while the bytes their detection takes
# (faces.detection_bytes, the decoded photos included) fit this: peak memory is bounded by
# bytes, not by a count of photos (16 photos of 4.8 MP at once took 2.6 GB). A photo at the
# 50 MP limit takes about 210 MB alone; some 190 LFW-sized (250 px) photos fit together.
DETECT_BYTES = 256 * 2**20
SAVE_EVERY_S = 60.0     # a long first embedding saves its progress this often; a kill loses less
# What faces.decode reads: jpg and png, and gif and webp through PIL (an animation's first
# frame).
PHOTO_SUFFIXES = ds.IMAGE_SUFFIXES | {".gif", ".webp"}


class IdentifyError(Exception):
    """Bad input; the message names the file and the fix."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gallery", help="folder of <person>/<photo> files (jpg, jpeg, png, gif, webp)")
    p.add_argument("queries", nargs="+", metavar="query", help="photos to identify")
    p.add_argument("--checkpoint", default=None,
                   help="a best_*.pt or a run folder (default: the newest "
                        "logs/<run>/best_accuracy.pt)")
    p.add_argument("--top", type=int, default=5, help="people listed per face")
    p.add_argument("--threshold", type=float, default=None,
                   help="a best score below it is 'unknown' (wins over --far; default: the "
                        "checkpoint's accuracy-optimal one)")
    p.add_argument("--far", type=float, default=None,
                   help="false-accept rate per compared photo: use the checkpoint's threshold "
                        "for it (1e-2, 1e-3 or 1e-4)")
    p.add_argument("--json", action="store_true", help="print a machine-readable list")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be 1 or more")
    return args


# ------------------------------------------------------------------ scores and search

def person_scores(scores, person_of, n_people):
    """(M, N) photo scores -> (M, n_people): each person's best photo.

    The rule: a person with several photos is matched by the best of them (max over their
    photos). Why: a person's photos differ in pose, light and age, and the query matches the
    one taken in conditions like its own; a mean of scores or of embeddings would let one odd
    photo pull a true match under the threshold, and would penalise people with more varied
    photos. The best single pair is also exactly what the threshold was fitted on (a pair
    score), so "known" keeps verify.py's meaning. BLUFR's open-set protocol for LFW scores a
    gallery person the same way. The cost: each extra photo is one more chance of a false
    match, so people with many photos draw slightly more false alarms."""
    out = torch.full((len(scores), n_people), float("-inf"), dtype=scores.dtype)
    return out.scatter_reduce_(1, person_of.expand_as(scores), scores, "amax",
                               include_self=True)


def search(scores, person_of, n_people, k):
    """(values, people) of the top k people per query row, best first."""
    return person_scores(scores, person_of, n_people).topk(min(k, n_people), dim=1)


def search_seconds(n, dim=256, k=5, repeats=5, seed=0):
    """Median seconds one query takes to search a gallery of n random unit float32
    embeddings of dim dimensions (people as in LFW: 5,749 for 13,233 photos): the matrix
    product, the best photo per person and the top k, as identify.py searches."""
    gen = torch.Generator().manual_seed(seed)
    gallery = F.normalize(torch.randn(n, dim, generator=gen), dim=1)
    n_people = max(1, n * 5749 // 13233)
    person_of = torch.randint(0, n_people, (n,), generator=gen)
    query = torch.randn(1, dim, generator=gen)
    net = m.SiameseNet(backbone=torch.nn.Identity(), distance="cosine")
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        search(net.score_matrix(query, gallery), person_of, n_people, k)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# ------------------------------------------------------------------ the gallery folder

def scan_gallery(folder):
    """dataset.scan_people (the one rule for what counts as a person's photo) with the
    wider PHOTO_SUFFIXES a gallery takes."""
    return ds.scan_people(folder, suffixes=PHOTO_SUFFIXES)


def gallery_files(folder):
    """[(person, path)] of GALLERY/<person>/<photo>, sorted, by dataset.scan_people's rule:
    hidden files and folders are left out, linked person folders followed. IdentifyError
    when the folder is missing or holds no photo."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IdentifyError(f"{folder}: no such gallery folder; pass a folder of "
                            "<person>/<photo>.jpg files, one subfolder per person")
    files = [(person, p) for person, photos in scan_gallery(folder).items() for p in photos]
    if not files:
        loose = sum(p.suffix.lower() in PHOTO_SUFFIXES for p in folder.iterdir())
        hint = f" ({loose} photos lie directly in it)" if loose else ""
        raise IdentifyError(f"{folder}: no <person>/<photo> images (jpg, jpeg, png, gif, "
                            f"webp) in it"
                            f"{hint}; put each person's photos in a subfolder named after them")
    return files


def cache_path(folder, ckpt_sha):
    return Path(folder) / f"{CACHE_PREFIX}{ckpt_sha[:16]}.pt"


def bad_embeddings(emb):
    """(n,) True where a row of (n, d) embeddings cannot be searched: NaN, infinite or all
    zero (a cosine net would score it the same against every query)."""
    return ~torch.isfinite(emb).all(dim=1) | (emb == 0).all(dim=1)


def cache_problem(saved, ckpt_sha, dim):
    """Why a loaded cache cannot be used for this checkpoint (its embeddings dim wide), or
    None. Its checkpoint hash alone proves nothing: the file may be forged or damaged."""
    if not isinstance(saved, dict) or saved.get("version") != CACHE_VERSION:
        return "not a cache of this version of identify.py"
    if saved.get("checkpoint_sha256") != ckpt_sha:
        return "another checkpoint's cache"
    hashes, emb, failed = saved.get("hashes"), saved.get("embeddings"), saved.get("failed")
    if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes) \
            or not isinstance(failed, dict) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in failed.items()):
        return "its photo list is damaged"
    if not isinstance(emb, torch.Tensor) or not emb.is_floating_point():
        return "its embeddings are not a float tensor"
    if not hashes:
        return None if emb.numel() == 0 else "it holds embeddings of no photo"
    if emb.ndim != 2 or len(emb) != len(hashes) or (dim is not None and emb.shape[1] != dim):
        return (f"its embeddings are {tuple(emb.shape)}, not ({len(hashes)}, "
                f"{dim or 'd'}) for its {len(hashes)} photos")
    bad = int(bad_embeddings(emb).sum())
    return f"{bad} of its embeddings are NaN, infinite or zero" if bad else None


def load_cache(path, ckpt_sha, dim=None):
    """({sha256: embedding}, {sha256: why no face}) from a cache file; empty when there is
    none, or when it is damaged, forged or another checkpoint's (with a warning saying why:
    it is rebuilt). dim: the width of the checkpoint's embeddings, if known."""
    if not path.is_file():
        return {}, {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        why = cache_problem(saved, ckpt_sha, dim)
    except Exception:  # torch.load fails in many ways on a truncated or foreign file
        why = "unreadable"
    if why:
        print(f"warning: {printable(path)}: {why}; re-embedding the gallery", file=sys.stderr)
        return {}, {}
    return dict(zip(saved["hashes"], saved["embeddings"].float())), dict(saved["failed"])


def save_cache(path, ckpt_sha, known, failed, live):
    """Write the cache atomically, keeping only the photos now in the gallery (live hashes)."""
    hashes = sorted(h for h in known if h in live)
    saved = {"version": CACHE_VERSION, "checkpoint_sha256": ckpt_sha, "hashes": hashes,
             "embeddings": torch.stack([known[h] for h in hashes]) if hashes else torch.empty(0),
             "failed": {h: why for h, why in failed.items() if h in live}}
    try:
        write_atomic(path, write=lambda tmp: torch.save(saved, tmp))
    except OSError as e:  # a read-only gallery still answers, it just embeds again next time
        print(f"warning: {printable(path)}: cannot write the cache ({e.strerror or e}); the "
              "gallery will be embedded again next time", file=sys.stderr)


def detection_batches(photos, budget=DETECT_BYTES):
    """MTCNN batches of gallery photos read one at a time: photos, an iterable of (item,
    (height, width)), go out as lists of items of one size, each list as soon as it must be
    detected. Photos wait, grouped by size, while the detection bytes
    (faces.detection_bytes) of all that wait fit the budget; when the next photo would not
    fit, the batches holding the most bytes are detected first until it does. So memory
    stays under the budget (plus the photo just read) whatever the sizes and their order,
    and a photo over the budget on its own is detected alone. The rest go out at the end."""
    waiting, held = {}, {}  # size -> items; size -> their bytes
    for item, size in photos:
        cost = faces.detection_bytes(*size)
        while waiting and sum(held.values()) + cost > budget:
            biggest = max(held, key=held.get)
            held.pop(biggest)
            yield waiting.pop(biggest)
        waiting.setdefault(size, []).append(item)
        held[size] = held.get(size, 0) + cost
    yield from waiting.values()


def embed_new(todo, fm, known, failed, save, progress=None):
    """Detect and embed the gallery photos not in the cache, [(path, sha256)], into known
    (embeddings) and failed (no face, unreadable, an embedding that is not finite): photos
    go through fm's detector in detection_batches, faces through its net about BATCH at a
    time (fm, an inference.FaceModel, embeds them as verify.py does). save() now
    and then, and progress(done, total) after each detection batch if given (the demo's
    progress bar)."""
    pending, last_save, done = [], time.perf_counter(), [0]

    def photos():
        for path, sha in tqdm(todo, desc="gallery", unit="photo", disable=None, leave=False):
            done[0] += 1
            try:
                image = faces.read_image(path)
            except faces.FaceError as e:  # unreadable or damaged: skipped with its reason
                failed[sha] = str(e).removeprefix(f"{path}: ")
                continue
            yield (sha, image), tuple(image.shape[1:])

    def embed():
        if pending:
            emb = fm.embed([c for _, c in pending])
            for (sha, _), row, bad in zip(pending, emb, bad_embeddings(emb).tolist()):
                if bad:  # would score the same against every query, or NaN
                    failed[sha] = "the model gave it an embedding of NaN, infinite or zero " \
                                  "values (a damaged checkpoint?)"
                else:
                    known[sha] = row
            pending.clear()
    for batch in detection_batches(photos()):
        found = fm.faces([img for _, img in batch])
        for (sha, _), (crop, _) in zip(batch, found):
            if crop is None:  # recorded without the path: the key is the content
                failed[sha] = "no face found"
            else:
                pending.append((sha, crop))
        if len(pending) >= BATCH:
            embed()
        if time.perf_counter() - last_save > SAVE_EVERY_S:
            embed()
            save()
            last_save = time.perf_counter()
        if progress is not None:
            progress(done[0], len(todo))
    embed()
    if progress is not None:
        progress(len(todo), len(todo))


def gallery_state(folder, files, fm):
    """What the cache already holds for the folder's photos: (hashes {path: sha256},
    warnings, known, failed, todo [(path, sha256)] of the photos not embedded yet). Every
    file is hashed once here; load_gallery takes the state, so a caller that first wants to
    know how much is new (the demo) hashes nothing twice."""
    hashes, warnings = {}, []
    for _, path in files:
        try:
            hashes[path] = sha256_file(path)
        except OSError as e:
            warnings.append(f"{path}: skipped, cannot read it ({e.strerror or e})")
    known, failed = load_cache(cache_path(folder, fm.sha256), fm.sha256,
                               getattr(fm.net.backbone, "out_dim", None))
    todo = [(p, h) for h, p in {h: p for p, h in hashes.items()
                                if h not in known and h not in failed}.items()]
    return hashes, warnings, known, failed, todo


def load_gallery(folder, files, fm, state=None, progress=None):
    """The gallery of inference.FaceModel fm, its cache brought up to date: people, photos
    with a face, each photo's person, the search matrix, and a warning per photo left out.
    state: gallery_state's, if the caller has it; progress(done, total): called while new
    photos are embedded."""
    hashes, warnings, known, failed, todo = state or gallery_state(folder, files, fm)
    warnings = list(warnings)
    where, live = cache_path(folder, fm.sha256), set(hashes.values())

    def save():
        save_cache(where, fm.sha256, known, failed, live)
    if todo or not where.is_file() or (set(known) | set(failed)) - live:
        embed_new(todo, fm, known, failed, save, progress)
        save()
    index, people, photos, person_of, rows, owner = {}, [], [], [], [], {}
    for person, path in files:
        h = hashes.get(path)
        if h is None:
            continue
        if h in failed:
            warnings.append(f"{path}: skipped, {failed[h]}")
            continue
        first = owner.setdefault(h, (person, path))  # files come sorted by person
        if first[0] != person:
            warnings.append(f"{path}: skipped, the same photo (the same content) as {first[1]}, "
                            f"which is kept under {first[0]}, the first of its people by folder "
                            "name; one photo cannot be two people: remove it from the wrong "
                            "person's folder")
            continue
        if person not in index:
            index[person] = len(people)
            people.append(person)
        photos.append(path)
        person_of.append(index[person])
        rows.append(known[h])
    if not rows:
        raise IdentifyError(f"{folder}: no face found in any of its {len(files)} photos; use "
                            "photos where the face is clearly visible and roughly frontal")
    person_of = torch.tensor(person_of)
    return SimpleNamespace(
        folder=Path(folder), people=people, photos=photos, person_of=person_of,
        members=[torch.nonzero(person_of == i).flatten() for i in range(len(people))],
        matrix=fm.prepare_gallery(torch.stack(rows)), warnings=warnings,
        n_new=len(todo), n_files=len(files))


# ------------------------------------------------------------------ answering

def answer_faces(scores, gallery, k, threshold):
    """Per query face (a row of scores): its top k people, each with their best photo, and
    the verdict: the best person if their score reaches the threshold, else unknown."""
    values, people = search(scores, gallery.person_of, len(gallery.people), k)
    out = []
    for row, (vals, idx) in enumerate(zip(values.tolist(), people.tolist())):
        top = []
        for v, p in zip(vals, idx):
            members = gallery.members[p]
            photo = gallery.photos[int(members[scores[row, members].argmax()])]
            top.append({"person": gallery.people[p], "score": v, "photo": str(photo)})
        known = top[0]["score"] >= threshold
        out.append({"identity": top[0]["person"] if known else None, "known": known,
                    "score": top[0]["score"], "top": top})
    return out


def answer_queries(queries, fm, gallery, k, threshold):
    """Every face of every query photo, answered by inference.FaceModel fm: [{query,
    n_faces, faces: [{box, ...}]}]."""
    found = [(q, fm.every_face(image)) for q, image in queries]
    crops = [crop for _, fs in found for crop, _ in fs]
    answers = iter([])
    if crops:
        scores = fm.score_matrix(fm.embed(crops), gallery.matrix)
        answers = iter(answer_faces(scores, gallery, k, threshold))
    return [{"query": str(q), "n_faces": len(fs),
             "faces": [{"box": info["box"], **next(answers)} for _, info in fs]}
            for q, fs in found]


def identify(args, say=print):
    """Load, embed the gallery (cache first), answer every query; say() the checkpoint first."""
    if args.threshold is not None:  # cheap checks first
        finite(args.threshold, "--threshold", "pass a score such as 0.5, or leave it "
                        "out for the checkpoint's own")
    if args.far is not None:
        op.check_far(args.far)
    queries = [(q, faces.read_image(q)) for q in args.queries]
    files = gallery_files(args.gallery)
    device = pick_device(args.device)
    set_threads()
    fm = FaceModel.load(args.checkpoint, device)
    path = fm.path
    threshold, source, meaning = fm.decision(args.threshold, args.far)
    threshold = finite(threshold, f"{path}: its threshold", "pass --threshold")
    say(printable(f"{fm.describe()} (threshold {threshold:.4f}, "
                  f"{source_text(source, args.far)})"))
    if meaning:
        say(f"threshold: {meaning}")
    gallery = load_gallery(args.gallery, files, fm)
    chance = stranger_chance(fm, threshold, len(gallery.photos), args)
    if chance:
        say(chance)
    for w in gallery.warnings:
        print(f"warning: {printable(w)}", file=sys.stderr)
    say(f"gallery: {printable(args.gallery)}: {len(gallery.people)} people in "
        f"{len(gallery.photos)} photos with a face "
        f"({gallery.n_files - len(gallery.photos)} skipped); "
        f"{gallery.n_new} photos embedded now, the others from the cache")
    results = answer_queries(queries, fm, gallery, args.top, threshold)
    common = {"gallery": str(args.gallery), "checkpoint": str(path), "threshold": threshold,
              "threshold_source": source, "threshold_meaning": meaning, "far": args.far}
    return [{**r, **common} for r in results]


def stranger_chance(fm, threshold, n_photos, args):
    """What a per-pair false-accept rate means for a search: a stranger is compared with
    every gallery photo, so their chance of matching someone grows with the gallery, about
    1 - (1 - FAR)^photos. None without a measured FAR for this threshold."""
    if args.threshold is not None:
        return None
    ops = fm.ckpt.get("operating_points") or {}
    point = ops.get("points", {}).get(op.far_key(args.far)) if args.far is not None \
        else ops.get("accuracy")
    if not point or not n_photos:
        return None
    chance = 1 - (1 - point["far"]) ** n_photos
    return (f"with {n_photos} gallery photos, a stranger's face matches someone at this "
            f"threshold with a chance of about {chance:.0%} (FAR {point['far']:.2g} per photo)")


def printable(text):
    """Text that prints as one line: each character Python's repr would escape (control
    characters such as a newline or a terminal escape, a file name's undecodable bytes,
    line separators, bidirectional overrides) written as that escape (\\n, \\x1b, \\udcff);
    letters of every script stay as they are."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def json_safe(value):
    """value with each float that is not finite (NaN, infinity) made None: JSON has no NaN,
    and json.dumps would otherwise print one."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def print_results(results):
    for r in results:
        query = printable(r["query"])
        if not r["n_faces"]:
            print(f"{query}: no face found")
            continue
        print(f"{query}: {r['n_faces']} face{'s' if r['n_faces'] > 1 else ''}")
        for i, f in enumerate(r["faces"], 1):
            box = ", ".join(f"{v:.0f}" for v in f["box"])
            verdict = f"{printable(f['identity'])} (score {f['score']:.4f} >= threshold " \
                f"{r['threshold']:.4f})" if f["known"] else \
                f"unknown (best score {f['score']:.4f} < threshold {r['threshold']:.4f})" \
                if math.isfinite(f["score"]) else \
                f"unknown (the score is {f['score']}, not a number: a damaged checkpoint?)"
            print(f"  face {i} at [{box}]: {verdict}")
            names = [printable(t["person"]) for t in f["top"]]
            for rank, (t, name) in enumerate(zip(f["top"], names), 1):
                photo = Path(t["photo"]).relative_to(r["gallery"])  # the person's best photo
                print(f"    {rank}. {name:<{max(map(len, names))}}  {t['score']:.4f}  "
                      f"({printable(photo)})")


def main(argv=None):
    args = parse_args(argv)
    try:
        # --json keeps stdout for the JSON alone, which names the checkpoint in each entry.
        results = identify(args, say=(lambda line: None) if args.json else print)
    except (IdentifyError, DeviceError, NotFinite, faces.FaceError, m.CheckpointError,
            op.BadRate) as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # any other failure is an error too, in one line
        print(f"error: {printable(error_line(e))}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json_safe(results), indent=2, allow_nan=False))
    else:
        print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
