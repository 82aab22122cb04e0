"""Crop every face in dataset/images into cropped_dataset/ with MTCNN, in batches.

    python crop_dataset_to_faces.py [--src dataset/images] [--dst cropped_dataset] [--size 112]
        [--mode align|bbox] [--margin M] [--batch-size 64] [--device auto|cpu|cuda]
        [--workers N] [--limit N] [--overwrite]

align (default): 5-point similarity transform onto the ArcFace template. bbox: box + margin.
No face: a centre crop, listed in DST/report.csv. Resumable; every file written atomically.
"""
import argparse
import csv
import os
import sys
import time
from pathlib import Path

from torchvision.io import encode_jpeg
from tqdm import tqdm

import faces
from dataset import IMAGE_SUFFIXES
from runtime import pick_device, set_threads


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default="dataset/images", help="folder of <person>/<image> photos")
    p.add_argument("--dst", default="cropped_dataset", help="output folder (same layout)")
    p.add_argument("--size", type=int, default=112, help="side of the square crops in pixels")
    p.add_argument("--mode", choices=["align", "bbox"], default="align")
    p.add_argument("--margin", type=float, default=8,
                   help="bbox mode: pixels of the output kept around the box on each side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=None, help="CPU threads (default: free cores)")
    p.add_argument("--min-face", type=int, default=40,
                   help="smallest face MTCNN looks for, in pixels; LFW faces are ~100 px and a "
                        "larger minimum skips the costliest pyramid levels")
    p.add_argument("--limit", type=int, default=None, help="crop only the first N images")
    p.add_argument("--overwrite", action="store_true", help="redo crops that already exist")
    return p.parse_args(argv)


def find_images(src):
    if not src.is_dir():
        raise SystemExit(f"error: {src}: no such folder; run `python download_data.py` first "
                         "or pass --src")
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"error: {src}: no .jpg/.png images in it; run "
                         "`python download_data.py --force` or pass the right --src")
    return files


def load_report(path):
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        return {row["file"]: row["reason"] for row in csv.DictReader(f)}


def save_report(path, rows):
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "reason"])
        w.writerows(sorted(rows.items()))
    os.replace(tmp, path)


def write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None):
    args = parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    files = find_images(src)[:args.limit]
    dst.mkdir(parents=True, exist_ok=True)
    report_path = dst / "report.csv"
    report = {} if args.overwrite else load_report(report_path)

    def out_path(f):  # keep the layout; crops are always JPEG
        return (dst / f.relative_to(src)).with_suffix(".jpg")

    todo = [f for f in files if args.overwrite or not out_path(f).exists()]
    skipped = len(files) - len(todo)
    device = pick_device(args.device)
    threads = set_threads(args.workers)
    detector = faces.load_detector(device, min_face_size=args.min_face)
    print(f"cropping {len(todo)} images ({skipped} already done) from {src} to {dst}, "
          f"mode={args.mode}, size={args.size}, device={device}, threads={threads}")

    counts = {"found": 0, "fallback": 0, "unreadable": 0}
    buckets = {}  # image size -> [(file, image)]: MTCNN batches need one size

    def flush(key):
        batch = buckets.pop(key)
        crops, infos = faces.crop_faces(detector, [img for _, img in batch], size=args.size,
                                        mode=args.mode, margin=args.margin, rule="center")
        for (f, _), crop, info in zip(batch, crops, infos):
            write_atomic(out_path(f), encode_jpeg(crop, quality=95).numpy().tobytes())
            name = str(f.relative_to(src))
            if info["found"]:
                counts["found"] += 1
                report.pop(name, None)
            else:
                counts["fallback"] += 1
                report[name] = "no face found: centre crop"
        bar.update(len(batch))

    start = time.time()
    bar = tqdm(total=len(todo), unit="img", desc="crop")
    try:
        for f in todo:
            try:
                img = faces.read_image(f)
            except faces.FaceError as e:
                counts["unreadable"] += 1
                report[str(f.relative_to(src))] = f"unreadable, skipped: {e}"
                bar.update(1)
                continue
            key = tuple(img.shape)
            buckets.setdefault(key, []).append((f, img))
            if len(buckets[key]) >= args.batch_size:
                flush(key)
        for key in list(buckets):
            flush(key)
    finally:  # an interrupted run keeps its report; finished crops are already on disk
        bar.close()
        save_report(report_path, report)
    seconds = time.time() - start
    done = counts["found"] + counts["fallback"]
    print(f"done: {done} cropped in {seconds:.0f} s ({done / max(seconds, 1e-9):.1f} images/s); "
          f"{counts['found']} faces found, {counts['fallback']} centre-crop fallbacks, "
          f"{counts['unreadable']} unreadable, {skipped} skipped (already cropped). "
          f"Fallbacks and unreadable files are listed in {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
