"""Who, among the people I know, is in this photo? 1:N identification against a gallery.

    python identify.py GALLERY QUERY... [--checkpoint PATH] [--top 5] [--threshold T] [--json]
        [--device auto|cpu|cuda]

GALLERY is a folder of <person>/<photo>.jpg (jpeg, png) files: one folder per person, named
after them, with one or more photos each. Each gallery photo gives one face, its most
prominent, built with the checkpoint's crop settings as verify.py builds an upload's
(faces.faces_for_model; same-sized photos are detected in batches); a photo without a face
is skipped with a warning. Every face of each QUERY photo is answered, with its box: the
--top people of the gallery by score, and "unknown" when the best score is below the
threshold (default: the checkpoint's validation threshold, so that "known" means what "same
person" means in verify.py).

A person with several photos is matched by the best of them (the highest score over that
person's photos): see person_scores.

The gallery's embeddings are cached beside it, in GALLERY/.identify-cache-<checkpoint>.pt,
keyed by each file's content (SHA-256) and the checkpoint: a later run embeds only new or
changed photos, and removed ones drop out. Photos without a face are recorded too, so they
are not searched again. Search is one matrix product over the gallery's embeddings.

Without --checkpoint, the newest logs/<run>/best_accuracy.pt is used, or with no run of your
own the model shipped in models/ (said on the first line).
Exit status: 0 every query photo answered (a photo without a face is answered "no face
found"); 2 an error (one line on stderr naming the file and the fix).
"""
import argparse
import hashlib
import json
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
from runtime import autocast, error_line, pick_device, set_threads, write_atomic

CACHE_VERSION = 1
CACHE_PREFIX = ".identify-cache-"
BATCH = 64              # gallery faces embedded per call
DETECT_BATCH = 16       # same-sized gallery photos per MTCNN call
SAVE_EVERY_S = 60.0     # a long first embedding saves its progress this often; a kill loses less


class IdentifyError(Exception):
    """Bad input; the message names the file and the fix."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gallery", help="folder of <person>/<photo>.jpg files")
    p.add_argument("queries", nargs="+", metavar="query", help="photos to identify")
    p.add_argument("--checkpoint", default=None,
                   help="a best_*.pt or a run folder (default: the newest "
                        "logs/<run>/best_accuracy.pt)")
    p.add_argument("--top", type=int, default=5, help="people listed per face")
    p.add_argument("--threshold", type=float, default=None,
                   help="a best score below it is 'unknown' (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print a machine-readable list")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be 1 or more")
    return args


# ------------------------------------------------------------------ scores and search

def prepare_gallery(net, embeddings):
    """The gallery matrix that score_matrix searches, made once per gallery: L2-normalised
    rows for a cosine net, the embeddings as they are for an L1 one."""
    return F.normalize(embeddings.float(), dim=1) if net.distance == "cosine" \
        else embeddings.float()


@torch.no_grad()
def score_matrix(net, queries, gallery):
    """(M, N) pair scores of M query embeddings against a prepare_gallery() matrix: exactly
    net.score(query, photo) for every pair (higher = same person), on the scale of the
    checkpoint's threshold. Cosine nets: one matrix product of unit vectors (cos - 1 for the
    embedding losses, the bce head on cos otherwise); L1: cdist, or the bce head on
    |q - g| in chunks of pairs."""
    queries = queries.float().to(gallery.device)
    if net.distance == "cosine":
        cos = F.normalize(queries, dim=1) @ gallery.T
        if net.loss != "bce":
            return cos - 1
        device = net.head.weight.device
        return net.head(cos.unsqueeze(-1).to(device)).squeeze(-1).float().cpu()
    if net.loss != "bce":
        return -torch.cdist(queries, gallery, p=1)
    n, device = len(gallery), net.head.weight.device
    flat = torch.arange(len(queries) * n)
    return torch.cat([net.score(queries[idx // n].to(device), gallery[idx % n].to(device))
                      .float().cpu() for idx in flat.split(m.SCORE_CHUNK)]
                     ).view(len(queries), n) if len(flat) else torch.empty(len(queries), n)


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
    net = SimpleNamespace(loss="arcface", distance="cosine")
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        search(score_matrix(net, query, gallery), person_of, n_people, k)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# ------------------------------------------------------------------ embedding

def embed_faces(net, crops, image_size, device, amp):
    """Embeddings (n, d), float32 on the CPU, of uint8 face crops: fitted to the net's input
    size and embedded in the checkpoint's mixed precision, as model.score_faces does, so
    that scores are on the scale of its threshold."""
    x = torch.stack([ds.fit(c, image_size) for c in crops])
    with autocast(amp, device):
        return m.embed_images(net, x, ds.eval_transform(), BATCH, device)


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gallery_files(folder):
    """[(person, path)] of GALLERY/<person>/<photo>, sorted; hidden files and folders are
    left out. IdentifyError when the folder is missing or holds no photo."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IdentifyError(f"{folder}: no such gallery folder; pass a folder of "
                            "<person>/<photo>.jpg files, one subfolder per person")
    files = [(d.name, p) for d in sorted(folder.iterdir())
             if d.is_dir() and not d.name.startswith(".")
             for p in sorted(d.iterdir())
             if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in ds.IMAGE_SUFFIXES]
    if not files:
        loose = sum(p.suffix.lower() in ds.IMAGE_SUFFIXES for p in folder.iterdir())
        hint = f" ({loose} photos lie directly in it)" if loose else ""
        raise IdentifyError(f"{folder}: no <person>/<photo> images (jpg, jpeg, png) in it"
                            f"{hint}; put each person's photos in a subfolder named after them")
    return files


def cache_path(folder, ckpt_sha):
    return Path(folder) / f"{CACHE_PREFIX}{ckpt_sha[:16]}.pt"


def load_cache(path, ckpt_sha):
    """({sha256: embedding}, {sha256: why no face}) from a cache file; empty when there is
    none, or when it is damaged or another checkpoint's (with a warning: it is rebuilt)."""
    if not path.is_file():
        return {}, {}
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["version"] != CACHE_VERSION or saved["checkpoint_sha256"] != ckpt_sha:
            raise ValueError("another version or checkpoint")
        return dict(zip(saved["hashes"], saved["embeddings"])), dict(saved["failed"])
    except Exception:  # torch.load fails in many ways on a truncated or foreign file
        print(f"warning: {path}: unreadable or another checkpoint's cache; re-embedding the "
              "gallery", file=sys.stderr)
        return {}, {}


def save_cache(path, ckpt_sha, known, failed, live):
    """Write the cache atomically, keeping only the photos now in the gallery (live hashes)."""
    hashes = sorted(h for h in known if h in live)
    saved = {"version": CACHE_VERSION, "checkpoint_sha256": ckpt_sha, "hashes": hashes,
             "embeddings": torch.stack([known[h] for h in hashes]) if hashes else torch.empty(0),
             "failed": {h: why for h, why in failed.items() if h in live}}
    try:
        write_atomic(path, write=lambda tmp: torch.save(saved, tmp))
    except OSError as e:  # a read-only gallery still answers, it just embeds again next time
        print(f"warning: {path}: cannot write the cache ({e.strerror or e}); the gallery will "
              "be embedded again next time", file=sys.stderr)


def embed_new(todo, tools, known, failed, save, progress=None):
    """Detect and embed the gallery photos not in the cache, [(path, sha256)], into known
    (embeddings) and failed (no face, unreadable): same-sized photos go through MTCNN
    DETECT_BATCH at a time, faces through the net BATCH at a time. save() now and then, and
    progress(done, total) after each embedding batch if given (the demo's progress bar)."""
    pending, waiting, last_save, done = [], {}, time.perf_counter(), 0

    def detect(shape):
        batch = waiting.pop(shape, [])
        if batch:
            found = faces.faces_for_model(tools.detector, [img for _, img in batch],
                                          tools.settings)
            for (sha, _), (crop, _) in zip(batch, found):
                if crop is None:  # recorded without the path: the key is the content
                    failed[sha] = "no face found"
                else:
                    pending.append((sha, crop))

    def embed(everything=False):
        for shape in list(waiting) if everything else []:
            detect(shape)
        if pending:
            emb = embed_faces(tools.net, [c for _, c in pending], tools.image_size,
                              tools.device, tools.amp)
            known.update(zip([h for h, _ in pending], emb))
            pending.clear()
        if progress is not None:
            progress(done, len(todo))
    for path, sha in tqdm(todo, desc="gallery", unit="photo", disable=None, leave=False):
        done += 1
        try:
            image = faces.read_image(path)
        except faces.FaceError as e:
            failed[sha] = str(e).removeprefix(f"{path}: ")
            continue
        waiting.setdefault(tuple(image.shape), []).append((sha, image))
        if len(waiting[tuple(image.shape)]) >= DETECT_BATCH:
            detect(tuple(image.shape))
        if sum(map(len, waiting.values())) >= DETECT_BATCH:  # photos of many sizes
            embed(everything=True)
        if len(pending) >= BATCH:
            embed()
        if time.perf_counter() - last_save > SAVE_EVERY_S:
            embed(everything=True)
            save()
            last_save = time.perf_counter()
    embed(everything=True)


def gallery_state(folder, files, tools):
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
    known, failed = load_cache(cache_path(folder, tools.ckpt_sha), tools.ckpt_sha)
    todo = [(p, h) for h, p in {h: p for p, h in hashes.items()
                                if h not in known and h not in failed}.items()]
    return hashes, warnings, known, failed, todo


def load_gallery(folder, files, tools, state=None, progress=None):
    """The gallery, its cache brought up to date: people, photos with a face, each photo's
    person, the search matrix, and a warning per photo left out. state: gallery_state's, if
    the caller has it; progress(done, total): called while new photos are embedded."""
    hashes, warnings, known, failed, todo = state or gallery_state(folder, files, tools)
    warnings = list(warnings)
    where, live = cache_path(folder, tools.ckpt_sha), set(hashes.values())

    def save():
        save_cache(where, tools.ckpt_sha, known, failed, live)
    if todo or not where.is_file() or (set(known) | set(failed)) - live:
        embed_new(todo, tools, known, failed, save, progress)
        save()
    index, people, photos, person_of, rows = {}, [], [], [], []
    for person, path in files:
        h = hashes.get(path)
        if h is None:
            continue
        if h in failed:
            warnings.append(f"{path}: skipped, {failed[h]}")
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
        matrix=prepare_gallery(tools.net, torch.stack(rows)), warnings=warnings,
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


def answer_queries(queries, tools, gallery, k, threshold):
    """Every face of every query photo, answered: [{query, n_faces, faces: [{box, ...}]}]."""
    found = [(q, faces.every_face_for_model(tools.detector, image, tools.settings))
             for q, image in queries]
    crops = [crop for _, fs in found for crop, _ in fs]
    answers = iter([])
    if crops:
        emb = embed_faces(tools.net, crops, tools.image_size, tools.device, tools.amp)
        answers = iter(answer_faces(score_matrix(tools.net, emb.to(gallery.matrix.device),
                                                 gallery.matrix), gallery, k, threshold))
    return [{"query": str(q), "n_faces": len(fs),
             "faces": [{"box": info["box"], **next(answers)} for _, info in fs]}
            for q, fs in found]


def identify(args, say=print):
    """Load, embed the gallery (cache first), answer every query; say() the checkpoint first."""
    queries = [(q, faces.read_image(q)) for q in args.queries]  # cheap checks first
    files = gallery_files(args.gallery)
    device = pick_device(args.device)
    set_threads()
    path = m.resolve_checkpoint(args.checkpoint)
    net, ckpt = m.load_checkpoint(path, device)
    settings = m.checkpoint_crop_settings(ckpt, path)
    threshold = float(ckpt["threshold"] if args.threshold is None else args.threshold)
    source = "the checkpoint's validation threshold" if args.threshold is None else "--threshold"
    say(f"{m.describe_checkpoint(path)} (threshold {threshold:.4f}, {source})")
    tools = SimpleNamespace(
        net=net, settings=settings, detector=faces.detector_for(settings, device),
        device=device, image_size=ckpt["model_config"]["image_size"],
        amp=ckpt.get("config", {}).get("mixed_precision", False), ckpt_sha=sha256_file(path))
    gallery = load_gallery(args.gallery, files, tools)
    for w in gallery.warnings:
        print(f"warning: {w}", file=sys.stderr)
    say(f"gallery: {args.gallery}: {len(gallery.people)} people in {len(gallery.photos)} "
        f"photos with a face ({gallery.n_files - len(gallery.photos)} skipped); "
        f"{gallery.n_new} photos embedded now, the others from the cache")
    results = answer_queries(queries, tools, gallery, args.top, threshold)
    common = {"gallery": str(args.gallery), "checkpoint": str(path), "threshold": threshold,
              "threshold_source": "checkpoint" if args.threshold is None else "--threshold"}
    return [{**r, **common} for r in results]


def print_results(results):
    for r in results:
        if not r["n_faces"]:
            print(f"{r['query']}: no face found")
            continue
        print(f"{r['query']}: {r['n_faces']} face{'s' if r['n_faces'] > 1 else ''}")
        for i, f in enumerate(r["faces"], 1):
            box = ", ".join(f"{v:.0f}" for v in f["box"])
            verdict = f"{f['identity']} (score {f['score']:.4f} >= threshold " \
                f"{r['threshold']:.4f})" if f["known"] else \
                f"unknown (best score {f['score']:.4f} < threshold {r['threshold']:.4f})"
            print(f"  face {i} at [{box}]: {verdict}")
            width = max(len(t["person"]) for t in f["top"])
            for rank, t in enumerate(f["top"], 1):
                photo = Path(t["photo"]).relative_to(r["gallery"])  # the person's best photo
                print(f"    {rank}. {t['person']:<{width}}  {t['score']:.4f}  ({photo})")


def main(argv=None):
    args = parse_args(argv)
    try:
        # --json keeps stdout for the JSON alone, which names the checkpoint in each entry.
        results = identify(args, say=(lambda line: None) if args.json else print)
    except (IdentifyError, faces.FaceError, m.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # any other failure is an error too, in one line
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_results(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
