"""Crop every face in dataset/images into cropped_dataset/ with MTCNN, in batches.

    python crop_dataset_to_faces.py [--src dataset/images] [--dst cropped_dataset] [--size 112]
        [--mode align|bbox] [--margin M] [--min-face 40] [--quality 95] [--batch-size 64]
        [--device auto|cpu|cuda] [--workers N] [--limit N] [--overwrite]

align (default): 5-point similarity transform onto the ArcFace template. bbox: box + margin.
With several faces, the one nearest the centre (LFW labels it). The settings are written to
DST/crop_settings.json; training copies them into every checkpoint, so that verify.py and the
demo build a new photo's face the same way. No face: a centre crop; unreadable or oversized
files are skipped. Both are listed in DST/report.csv, each entry written before its crop, so
a killed run loses none. Resumable; every file written atomically.
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

from torchvision.io import encode_jpeg
from tqdm import tqdm

import faces
import dataset as ds
from runtime import DeviceError, pick_device, set_threads, write_atomic

D = faces.CROP_DEFAULTS
FOUND = "face found"  # a journal row that clears an older one for the same file


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default="dataset/images", help="folder of <person>/<image> photos")
    p.add_argument("--dst", default="cropped_dataset", help="output folder (same layout)")
    p.add_argument("--size", type=int, default=D["size"], help="side of the square crops in pixels")
    p.add_argument("--mode", choices=["align", "bbox"], default=D["mode"])
    p.add_argument("--margin", type=float, default=D["margin"],
                   help="bbox mode: pixels of the output kept around the box on each side")
    p.add_argument("--min-face", type=int, default=D["min_face"],
                   help="smallest face MTCNN looks for, in pixels; LFW faces are ~100 px and a "
                        "larger minimum skips the costliest pyramid levels")
    p.add_argument("--quality", type=int, default=D["jpeg_quality"], help="JPEG quality of crops")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=None, help="CPU threads (default: free cores)")
    p.add_argument("--limit", type=int, default=None, help="crop only the first N images")
    p.add_argument("--overwrite", action="store_true", help="redo crops that already exist")
    return p.parse_args(argv)


def find_images(src):
    """Every photo of src/<person>/, as training will read them (dataset.scan_people)."""
    if not src.is_dir():
        raise SystemExit(f"error: {src}: no such folder; run `python download_data.py` first "
                         "or pass --src")
    files = [p for photos in ds.scan_people(src).values() for p in photos]
    if not files:
        raise SystemExit(f"error: {src}: no <person>/<image> photos (.jpg/.png) in it; run "
                         "`python download_data.py --force` or pass the right --src")
    return files


def claim_settings(dst, settings, overwrite):
    """Write DST/crop_settings.json, refusing to mix crops of other settings into DST."""
    old = None
    if (dst / faces.SETTINGS_FILE).is_file():
        old = json.loads((dst / faces.SETTINGS_FILE).read_text())
    has_crops = any(dst.glob("*/*.jpg"))
    if has_crops and old != settings and not overwrite:
        made = f"with other settings ({old})" if old else \
            f"without a {faces.SETTINGS_FILE} (an older version of this script)"
        raise SystemExit(f"error: {dst}: holds crops made {made}; pass --overwrite to redo them "
                         f"all with {settings}, or choose another --dst")
    write_atomic(dst / faces.SETTINGS_FILE, json.dumps(settings, indent=2))


class Report:
    """DST/report.csv: one row per file that gave no face crop. Rows are appended and flushed
    before the crop is written, so a kill never loses one; a rerun rewrites it compacted."""

    def __init__(self, path, fresh):
        self.path, self.rows = path, {}
        if path.exists() and not fresh:
            with open(path, newline="") as f:
                for row in csv.DictReader(f):  # in order: a later row supersedes an earlier one
                    self.rows[row["file"]] = row["reason"]
            self.rows = {k: v for k, v in self.rows.items() if v != FOUND}
        self.compact()
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file)

    def compact(self):
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([["file", "reason"], *sorted(self.rows.items())])
        write_atomic(self.path, write=write)

    def add(self, rows):
        """rows: {file: reason, or None for a face found (clears an older row)}."""
        for name, reason in rows.items():
            if reason is None:
                if name not in self.rows:
                    continue
                del self.rows[name]
            else:
                self.rows[name] = reason
            self.writer.writerow([name, reason or FOUND])
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()
        self.compact()


def crop_batch(detector, batch, settings, src, out_path, report):
    """Crop one batch of same-sized images; returns (faces found, fallbacks)."""
    crops, infos = faces.crop_faces(detector, [img for _, img in batch], settings)
    report.add({str(f.relative_to(src)): None if info["found"] else "no face found: centre crop"
                for (f, _), info in zip(batch, infos)})
    for (f, _), crop in zip(batch, crops):
        write_atomic(out_path(f), encode_jpeg(crop, quality=settings["jpeg_quality"])
                     .numpy().tobytes())
    found = sum(info["found"] for info in infos)
    return found, len(batch) - found


def crop_all(todo, detector, settings, src, out_path, report, batch_size):
    """Read, batch by image size (MTCNN needs one size per batch) and crop; returns counts."""
    counts = {"found": 0, "fallback": 0, "skipped": 0}
    buckets = {}
    bar = tqdm(total=len(todo), unit="img", desc="crop")

    def flush(key):
        batch = buckets.pop(key)
        found, fallback = crop_batch(detector, batch, settings, src, out_path, report)
        counts["found"] += found
        counts["fallback"] += fallback
        bar.update(len(batch))

    try:
        for f in todo:
            try:
                img = faces.read_image(f)
            except faces.FaceError as e:  # unreadable or too large: list it and go on
                counts["skipped"] += 1
                report.add({str(f.relative_to(src)): f"skipped: {e}"})
                bar.update(1)
                continue
            buckets.setdefault(tuple(img.shape), []).append((f, img))
            if len(buckets[tuple(img.shape)]) >= batch_size:
                flush(tuple(img.shape))
        for key in list(buckets):
            flush(key)
    finally:
        bar.close()
    return counts


def main(argv=None):
    args = parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    settings = faces.crop_settings(size=args.size, mode=args.mode, margin=args.margin,
                                   min_face=args.min_face, jpeg_quality=args.quality)
    files = find_images(src)[:args.limit]
    dst.mkdir(parents=True, exist_ok=True)
    claim_settings(dst, settings, args.overwrite)

    def out_path(f):  # keep the layout; crops are always JPEG
        return (dst / f.relative_to(src)).with_suffix(".jpg")

    todo = [f for f in files if args.overwrite or not out_path(f).exists()]
    done_before = len(files) - len(todo)
    try:
        device = pick_device(args.device)
    except DeviceError as e:
        raise SystemExit(f"error: {e}") from None
    threads = set_threads(args.workers)
    detector = faces.detector_for(settings, device)
    print(f"cropping {len(todo)} images ({done_before} already done) from {src} to {dst}, "
          f"mode={args.mode}, size={args.size}, device={device}, threads={threads}")
    report = Report(dst / "report.csv", fresh=args.overwrite)
    start = time.time()
    try:
        counts = crop_all(todo, detector, settings, src, out_path, report, args.batch_size)
    finally:
        report.close()
    seconds = time.time() - start
    done = counts["found"] + counts["fallback"]
    reasons = list(report.rows.values())
    print(f"done: {done} cropped in {seconds:.0f} s ({done / max(seconds, 1e-9):.1f} images/s); "
          f"{counts['found']} faces found, {counts['fallback']} centre-crop fallbacks, "
          f"{counts['skipped']} skipped (unreadable or too large), {done_before} already cropped. "
          f"In all, {sum(r.startswith('no face') for r in reasons)} centre-crop fallbacks and "
          f"{sum(r.startswith('skipped') for r in reasons)} skipped files are listed in "
          f"{dst / 'report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
