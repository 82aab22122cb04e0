"""Fetch LFW (Labeled Faces in the Wild) images and protocol files into one verified layout.

    python download_data.py [--root dataset] [--variant original|funneled|deepfunneled]
                            [--archive PATH] [--protocol-dir DIR] [--force] [--verify]

Result, whatever the source:
    ROOT/images/<Name>/<Name>_NNNN.jpg
    ROOT/pairs.txt, pairsDevTrain.txt, ... (the seven protocol files)
    ROOT/manifest.json   variant, source, size and sha256 of every file (archive, protocol
                         files, each image), counts of people and images
    ROOT/downloads/      downloaded archives, kept so that a failed extraction loses nothing

A rerun checks ROOT against the manifest: exactly the listed images with their recorded sizes
(and, with --verify, their SHA-256), and the protocol files by size and SHA-256. Images that
differ are named in one line and extracted again from the archive; a protocol file that is
missing or differs is fetched (or copied from --protocol-dir) again, and nothing else is redone.

Sources are tried in order: the LFW home page on GitHub Pages, figshare (scikit-learn's mirror),
then the old UMass host. Offline, pass --archive and --protocol-dir instead.
"""

import argparse
import gzip
import hashlib
import http.client
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from runtime import sha256_file, write_atomic

VARIANTS = ("original", "funneled", "deepfunneled")
PROTOCOL_FILES = (
    "pairs.txt", "pairsDevTrain.txt", "pairsDevTest.txt",
    "people.txt", "peopleDevTrain.txt", "peopleDevTest.txt",
    "lfw-names.txt",
)
NAMES_FILE = "lfw-names.txt"
KAGGLE = "https://www.kaggle.com/datasets/jessicali9530/lfw-dataset"

# Where each file can be fetched: URL = base + files[local name]. Plain data so that tests can
# point the bases at a local server.
SOURCES = [
    {   # Official LFW home page, now on GitHub Pages. Its zips have no published checksum,
        # so the images are verified by content (counts against lfw-names.txt).
        "name": "LFW home page (GitHub Pages)",
        "base": "https://umass-vis-lfw.github.io/",
        "archives": {"original": "lfw.zip", "funneled": "lfw-funneled.zip",
                     "deepfunneled": "lfw-deepfunneled.zip"},
        "files": {name: name for name in
                  ("lfw.zip", "lfw-funneled.zip", "lfw-deepfunneled.zip") + PROTOCOL_FILES},
    },
    {   # figshare copies used by scikit-learn (sklearn/datasets/_lfw.py); no deepfunneled there.
        "name": "figshare (scikit-learn's mirror)",
        "base": "https://ndownloader.figshare.com/files/",
        "archives": {"original": "lfw.tgz", "funneled": "lfw-funneled.tgz"},
        "files": {"lfw.tgz": "5976018", "lfw-funneled.tgz": "5976015",
                  "pairsDevTrain.txt": "5976012", "pairsDevTest.txt": "5976009",
                  "pairs.txt": "5976006"},
    },
    {   # The original UMass host (torchvision's URLs). Mostly offline now; kept as last resort.
        "name": "UMass (old LFW host)",
        "base": "http://vis-www.cs.umass.edu/lfw/",
        "archives": {"original": "lfw.tgz", "funneled": "lfw-funneled.tgz",
                     "deepfunneled": "lfw-deepfunneled.tgz"},
        "files": {name: name for name in
                  ("lfw.tgz", "lfw-funneled.tgz", "lfw-deepfunneled.tgz") + PROTOCOL_FILES},
    },
]

# Known checksums by file name. A file whose name is listed must match one of its known sums
# (a name can have several: our repacked lfw-deepfunneled.tgz and UMass's original differ).
SHA256 = {
    "lfw.tgz": "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0",           # figshare
    "lfw-funneled.tgz": "b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a",  # figshare
    "lfw-deepfunneled.tgz": "6deb87cbad11d172344cc3d457a2cea3237bbc7d84ad7f2ff433e0a82c64e1b3",  # our copy
    "pairs.txt": "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592",
    "pairsDevTrain.txt": "1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa",
    "pairsDevTest.txt": "7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c",
    "people.txt": "bc8fa2b7f25c895cf7efb6de4f4fc27ca8b8d1cfa63350ad8b96eae2b198d365",
    "peopleDevTrain.txt": "2e58df13ba4cc143189336e001cc2c195f1dfa5b29a6475c02857be353c2a2fa",
    "peopleDevTest.txt": "c3ed1f90499473401542101a56c14c1d82396bb8218c67a356d7460601047555",
    "lfw-names.txt": "403cd39411ee297f99f69241959bd8f0496b44377711913a76ccdd8562874164",
}
# torchvision's sums for the UMass files (the protocol files are the same bytes as above).
MD5 = {
    "lfw.tgz": "a17d05bd522c52d84eca14327a23d494",
    "lfw-funneled.tgz": "1b42dfed7d15c9b2dd63d5e5840c86ad",
    "lfw-deepfunneled.tgz": "68331da3eb755a505a502b5aacb3c201",
    "pairs.txt": "9f1ba174e4e1c508ff7cdf10ac338a7d",
    "pairsDevTest.txt": "5132f7440eb68cf58910c8a45a2ac10b",
    "pairsDevTrain.txt": "4f27cbf15b2da4a85c1907eb4181ad21",
    "people.txt": "450f0863dd89e85e73936a6d71a3474b",
    "peopleDevTest.txt": "e4bf5be0a43b5dcd9dc5ccfcb8fb19c5",
    "peopleDevTrain.txt": "54eaac34beb6d042ed3a7d883e247a21",
    "lfw-names.txt": "a6d0a479bd074669f656265a6e693f6d",
}

TIMEOUT = 30       # seconds per socket operation
ATTEMPTS = 3       # per URL; a retry resumes the .part file
BACKOFF = 2.0      # seconds, times the attempt number
CHUNK = 1 << 20


class DataError(Exception):
    """A failure the user must act on; main() prints it as one line and exits 1."""


class FetchError(Exception):
    """One URL could not be fetched; the next source is tried."""

    def __init__(self, message, host_down=False):
        super().__init__(message)
        self.host_down = host_down


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- checksums

def file_digests(path):
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def verify(path, name, fix):
    """Check PATH against the known sums for NAME (if any); return its sha256."""
    sha, md5 = file_digests(path)
    known = [("sha256", SHA256.get(name), sha), ("md5", MD5.get(name), md5)]
    known = [(kind, want, got) for kind, want, got in known if want]
    if known and not any(want == got for _, want, got in known):
        kind, want, got = known[0]
        raise DataError(f"{path}: checksum mismatch for {name} (expected {kind} {want}, "
                        f"got {got}); {fix}")
    return sha


# ---------------------------------------------------------------- downloading

def fetch_once(url, part):
    """One HTTP request into PART, resuming it with a Range request when it already has bytes."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "lfw-download_data/1.0"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416:       # our .part is not a prefix of this file: start over
            part.unlink()
        raise
    with response:
        if have and response.status == 206:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                part.unlink()
                raise OSError("server answered the Range request with the wrong range")
            mode = "ab"
        else:                   # 200: the server ignored the Range header, so restart
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        done = have
        with open(part, mode) as out, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                           desc=part.name[:-5], disable=None, leave=False) as bar:
            while block := response.read(CHUNK):
                out.write(block)
                done += len(block)
                bar.update(len(block))
    # urllib returns short reads silently when the connection drops, so check the length.
    if total is not None and done != total:
        raise OSError(f"connection closed after {done} of {total} bytes")


def download(url, dest):
    """Download URL to DEST via DEST.part, with bounded retries that resume the part file."""
    part = dest.with_name(dest.name + ".part")
    error = None
    for attempt in range(1, ATTEMPTS + 1):
        try:
            fetch_once(url, part)
            os.replace(part, dest)
            return
        except urllib.error.HTTPError as e:
            error = e
            if 400 <= e.code < 500 and e.code not in (408, 416, 429):
                raise FetchError(f"{url}: HTTP {e.code}") from None   # missing: do not retry
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            error = e
        if attempt < ATTEMPTS:
            time.sleep(BACKOFF * attempt)
    reason = getattr(error, "reason", error)
    host_down = isinstance(error, urllib.error.URLError) and not isinstance(
        error, urllib.error.HTTPError)
    raise FetchError(f"{url}: {reason}", host_down=host_down)


def fetch_from_sources(name, dest, dead_hosts):
    """Try every source that has NAME; return the URL used. Hosts that refused us are skipped."""
    errors = []
    for source in SOURCES:
        if name not in source["files"]:
            continue
        url = source["base"] + source["files"][name]
        host = urlparse(url).netloc
        if host in dead_hosts:
            continue
        print(f"fetching {name} from {url}")
        try:
            download(url, dest)
            return url
        except FetchError as e:
            if e.host_down:
                dead_hosts.add(host)
            errors.append(str(e))
    raise FetchError("; ".join(errors) or "no source has it")


# ---------------------------------------------------------------- getting the files

def get_archive(args, root, dead_hosts):
    """Return (path, source, sha256) of the image archive: --archive, an earlier download or a fresh one."""
    if args.archive:
        path = Path(args.archive)
        if not path.is_file():
            raise DataError(f"{path}: no such file; check --archive")
        check_archive_format(path)
        return path, str(path.resolve()), verify(path, path.name, "check --archive")

    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    errors = []
    for source in SOURCES:
        name = source["archives"].get(args.variant)
        if name is None:
            continue
        url = source["base"] + source["files"][name]
        dest = downloads / name
        if args.force:
            dest.unlink(missing_ok=True)
        if dest.exists():   # a finished download from an earlier run
            print(f"using {dest} from an earlier run")
        else:
            host = urlparse(url).netloc
            if host in dead_hosts:
                continue
            print(f"fetching {name} from {url}")
            try:
                download(url, dest)
            except FetchError as e:
                if e.host_down:
                    dead_hosts.add(host)
                errors.append(str(e))
                continue
        return dest, url, verify(dest, name, "delete it and run again")
    raise DataError(
        f"could not download the {args.variant} LFW archive from any source "
        f"({'; '.join(errors) or 'no source has this variant'}). Download it by hand from Kaggle "
        f"({KAGGLE}) and run: python download_data.py --archive PATH")


def get_protocol_files(args, root, dead_hosts, kept=None):
    """Put the protocol files in ROOT; return {name: (source, sha256)}. Missing ones only warn.
    KEPT: {name: (source, sha256)} of files already in ROOT that need nothing done."""
    got = dict(kept or {})
    for name in PROTOCOL_FILES:
        dest = root / name
        if name in got:
            continue
        if args.protocol_dir:
            src = Path(args.protocol_dir) / name
            if not src.is_file():
                warn(f"{src} not found; continuing without {name}")
                continue
            sha = verify(src, name, "check --protocol-dir")
            if not (dest.exists() and dest.samefile(src)):
                write_atomic(dest, write=lambda tmp, src=src: shutil.copyfile(src, tmp))
            got[name] = (str(src.resolve()), sha)
            continue
        if dest.exists() and not args.force:
            # Kept from an earlier run; a bad copy must not silently survive.
            got[name] = (previous_source(root, name) or str(dest.resolve()),
                         verify(dest, name, "delete it and run again"))
            continue
        try:
            url = fetch_from_sources(name, dest, dead_hosts)
        except FetchError as e:
            warn(f"could not fetch {name} ({e}); continuing without it")
            continue
        try:
            got[name] = (url, verify(dest, name, "removed it; run again to fetch it afresh"))
        except DataError:
            dest.unlink()       # a bad download is worthless and must not sit in ROOT
            raise
    return got


def previous_source(root, name):
    try:
        return json.loads((root / "manifest.json").read_text())["files"][name]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------- extraction

def unsafe_reason(name, is_link):
    if is_link:
        return "is a link"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "contains '..'"
    return None


def checked_tar_members(tar, archive, bar):
    # Reject links and escaping paths ourselves too, for one clear message; filter="data"
    # is the second line of defence.
    for member in tar:
        reason = unsafe_reason(member.name, member.issym() or member.islnk())
        if reason:
            raise DataError(f"{archive}: member '{member.name}' {reason}; refusing to extract "
                            f"an unsafe archive (check --archive or re-download it)")
        bar.update(member.isfile())
        yield member


# Leading bytes of each archive format, and the file name ending that format should have.
MAGIC = ((b"PK\x03\x04", ".zip"), (b"PK\x05\x06", ".zip"), (b"\x1f\x8b", ".tgz"),
         (b"BZh", ".tar.bz2"), (b"\xfd7zXZ\x00", ".tar.xz"))
TAR_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def check_archive_format(path):
    """Refuse, in one line, a zip named like a tar or the reverse (extract() picks by name,
    and tarfile's own complaint about a zip is five lines that never say 'zip')."""
    with open(path, "rb") as f:
        head = f.read(262)
    real = next((ext for magic, ext in MAGIC if head.startswith(magic)),
                ".tar" if head[257:262] == b"ustar" else None)
    named_zip = path.name.lower().endswith(".zip")
    if real is None or (real == ".zip") == named_zip:
        return      # consistent, or unknown bytes: extraction gives the corrupt-file error
    stem = path.name
    for suffix in (".zip",) + TAR_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    what = "a zip archive" if real == ".zip" else f"a tar archive ({real})"
    raise DataError(f"{path} is really {what}, not what its name says; rename it to "
                    f"{stem}{real} and pass that to --archive")


def extract(archive, dest):
    """Extract ARCHIVE (zip or tar, any compression) into DEST, refusing unsafe members."""
    bar = tqdm(unit=" files", desc="extracting", disable=None, leave=False)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for info in members:
                    # zipfile has no extraction filter; symlinks show as S_IFLNK in the Unix mode.
                    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    reason = unsafe_reason(info.filename, is_link)
                    if reason:
                        raise DataError(f"{archive}: member '{info.filename}' {reason}; refusing "
                                        f"to extract an unsafe archive (check --archive or "
                                        f"re-download it)")
                for info in members:
                    zf.extract(info, dest)
                    bar.update(not info.is_dir())
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, members=checked_tar_members(tar, archive, bar), filter="data")
    except tarfile.FilterError as e:
        raise DataError(f"{archive}: unsafe member ({e}); refusing to extract it") from None
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError, zlib.error) as e:
        reason = " ".join(str(e).split())     # tarfile's messages span several lines
        raise DataError(f"{archive} is truncated or corrupt ({reason}): re-download it "
                        f"(delete it and run again, or check --archive)") from None
    finally:
        bar.close()


def find_image_root(folder, archive):
    """The folder holding the person folders, whatever the archive calls it (lfw/, lfw_funneled/, ...)."""
    roots = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__MACOSX" and not d.startswith(".")]
        if any(f.lower().endswith(".jpg") and not f.startswith(".") for f in filenames):
            roots.add(Path(dirpath).parent)
    if not roots:
        raise DataError(f"{archive}: no JPEG images found; is it an LFW archive? check --archive")
    if len(roots) > 1:
        shown = ", ".join(sorted(str(r.relative_to(folder)) for r in roots)[:3])
        raise DataError(f"{archive}: images in more than one folder ({shown}); "
                        f"pass an archive of one LFW variant")
    return roots.pop()


def count_images(images, archive):
    """{person: image count}; also drop stray hidden files and check the <Name>/<Name>_NNNN.jpg layout."""
    counts = {}
    for person in sorted(os.listdir(images)):
        path = images / person
        if person.startswith("."):          # e.g. macOS .DS_Store: not part of LFW
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            continue
        if not path.is_dir():
            raise DataError(f"{archive}: unexpected file '{person}' beside the person folders")
        n = 0
        for f in os.listdir(path):
            if f.startswith("."):
                (path / f).unlink()
                continue
            stem = f[len(person) + 1:-4]
            if not (f.startswith(person + "_") and f.endswith(".jpg") and len(stem) == 4
                    and stem.isdigit()):
                raise DataError(f"{archive}: unexpected file '{person}/{f}' "
                                f"(expected <Name>/<Name>_NNNN.jpg)")
            n += 1
        counts[person] = n
    return counts


def read_names(path):
    """lfw-names.txt: 'Name<TAB>count' per line."""
    expected = {}
    for line in path.read_text().splitlines():
        if line.strip():
            name, count = line.split()
            expected[name] = int(count)
    return expected


def check_counts(counts, names_file, archive):
    if names_file is None:
        warn(f"{NAMES_FILE} is unavailable; cannot check the image counts per person")
        return
    expected = read_names(names_file)
    wrong = sorted(p for p in expected.keys() | counts.keys() if counts.get(p) != expected.get(p))
    if wrong:
        p = wrong[0]
        raise DataError(
            f"{archive}: image counts do not match {NAMES_FILE} for {len(wrong)} people "
            f"(e.g. {p}: {counts.get(p, 0)} images, expected {expected.get(p, 0)}); the archive "
            f"is incomplete or not LFW: re-download it (delete it and run again, or check --archive)")


def guess_variant(name):
    name = name.lower().replace("_", "-")
    if "deepfunneled" in name:
        return "deepfunneled"
    if "funneled" in name:
        return "funneled"
    if name in ("lfw", "lfw.tgz", "lfw.tar.gz", "lfw.tar", "lfw.zip"):
        return "original"
    return None


def install_images(archive, root, names_file, variant=None):
    """Extract into ROOT/.tmp-extract-*, verify, then rename to ROOT/images. Return (counts, folder)."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-extract-", dir=root))
    try:
        print(f"extracting {archive}")
        extract(archive, tmp)
        images = find_image_root(tmp, archive)
        found = guess_variant(images.name)
        if variant and found and found != variant:
            raise DataError(f"{archive} holds the {found} images (folder '{images.name}') but "
                            f"--variant {variant} was given; drop --variant or check --archive")
        counts = count_images(images, archive)
        check_counts(counts, names_file, archive)
        # Swap in the new images only now that they are verified.
        final = root / "images"
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=".tmp-old-images-", dir=root))
            os.rename(final, old / "images")
            os.rename(images, final)
            shutil.rmtree(old)
        else:
            os.rename(images, final)
        return counts, images.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- idempotence

def image_entries(images):
    """{'<Name>/<Name>_NNNN.jpg': {size, sha256}} for every file under IMAGES."""
    entries = {}
    for dirpath, _, filenames in os.walk(images):
        for f in filenames:
            path = Path(dirpath) / f
            entries[path.relative_to(images).as_posix()] = {
                "size": path.stat().st_size, "sha256": sha256_file(path)}
    return dict(sorted(entries.items()))


def image_problems(images, listed, hashes):
    """How IMAGES differs from LISTED ({relative path: (size, sha256)}): missing or extra
    files, wrong sizes and, when HASHES, wrong content. Sizes catch truncation cheaply; a
    same-size change needs the hashes, which read all images, hence only with --verify."""
    found = {}
    for dirpath, _, filenames in os.walk(images):
        for f in filenames:
            path = Path(dirpath) / f
            found[path.relative_to(images).as_posix()] = path
    problems = [f"{n} is missing" for n in sorted(listed.keys() - found.keys())]
    problems += [f"{n} is not in the manifest" for n in sorted(found.keys() - listed.keys())]
    for name in sorted(listed.keys() & found.keys()):
        size, sha = listed[name]
        got = found[name].stat().st_size
        if got != size:
            problems.append(f"{name} has {got} bytes, expected {size}")
        elif hashes and sha256_file(found[name]) != sha:
            problems.append(f"{name} has changed (SHA-256 differs)")
    return problems


def intact_manifest(root, args):
    """The manifest when ROOT's images still match it, else None (the images are extracted
    again). Says in one line why existing images are not kept."""
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
        listed = {n: (e["size"], e["sha256"]) for n, e in manifest["image_files"].items()}
        variant, archive = manifest["variant"], manifest["files"][manifest["archive"]]
        if not all({"source", "sha256", "size"} <= e.keys() for e in manifest["files"].values()):
            raise KeyError("size")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        warn(f"{path} is unreadable or from an older version of this script; "
             f"extracting the images again")
        return None
    if args.variant and variant != args.variant:
        return None
    problems = image_problems(root / "images", listed, args.verify)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        warn(f"{root / 'images'} does not match {path}: {'; '.join(problems[:3])}{more}; "
             f"extracting the images again from {archive['source']}")
        return None
    return manifest


def kept_protocol_files(root, manifest):
    """{name: (source, sha256)} of the protocol files in ROOT that still match the manifest.
    One that differs is removed, so that it is fetched or copied again like a missing one."""
    kept = {}
    for name, entry in manifest["files"].items():
        if name not in PROTOCOL_FILES:
            continue
        path = root / name
        if not path.is_file():
            warn(f"{path} is gone; getting it again")
        elif path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]:
            kept[name] = (entry["source"], entry["sha256"])
        else:
            warn(f"{path} does not match {root / 'manifest.json'}; getting it again")
            path.unlink()
    return kept


def note_other_archive(args, root, manifest):
    """--archive is not used when the images are already there: say so, unless it is the same
    file (same path, or same size and bytes as the one the images came from)."""
    if not args.archive:
        return
    old = manifest["files"][manifest["archive"]]
    new = Path(args.archive)
    if str(new.resolve()) == old["source"]:
        return
    if new.is_file() and new.stat().st_size == old["size"] and sha256_file(new) == old["sha256"]:
        return
    warn(f"{root / 'images'} already holds the images from {old['source']}; --archive {new} "
         f"is not used (rerun with --force to extract from it instead)")


def protocol_entries(root, files):
    return {name: {"source": src, "sha256": sha, "size": (root / name).stat().st_size}
            for name, (src, sha) in files.items()}


def write_manifest(root, manifest):
    write_atomic(root / "manifest.json", json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="dataset", help="output folder (default: dataset)")
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="image set to download (default: deepfunneled; with --archive, "
                        "guessed from the archive)")
    p.add_argument("--archive", help="use this local LFW archive (.tgz/.tar.gz/.tar/.zip) "
                                     "instead of downloading")
    p.add_argument("--protocol-dir", help="copy the protocol files (pairs.txt, ...) from here "
                                          "instead of downloading")
    p.add_argument("--force", action="store_true", help="fetch and extract again")
    p.add_argument("--verify", action="store_true",
                   help="also compare every image's SHA-256 with manifest.json (reads all the "
                        "images). Every run already checks that exactly the listed images are "
                        "there with their recorded sizes; images that differ are named in one "
                        "line and extracted again from the archive.")
    return p.parse_args(argv)


def run(args):
    if args.protocol_dir and not Path(args.protocol_dir).is_dir():
        raise DataError(f"{args.protocol_dir}: no such folder; check --protocol-dir (the folder "
                        f"that holds pairs.txt, people.txt, lfw-names.txt, ...)")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):   # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    manifest = None if args.force else intact_manifest(root, args)
    if manifest:
        complete_protocol_files(args, root, manifest)
    else:
        install(args, root)


def complete_protocol_files(args, root, manifest):
    """The images match the manifest: get only the protocol files still missing or damaged."""
    note_other_archive(args, root, manifest)
    summary = f"{manifest['images']} images of {manifest['people']} people"
    kept = kept_protocol_files(root, manifest)
    if len(kept) == len(PROTOCOL_FILES):
        print(f"{args.root.rstrip('/')}/ is complete and verified ({summary}); nothing to do. "
              f"Use --force to fetch again.")
        return
    files = get_protocol_files(args, root, set(), kept)
    added = [n for n in PROTOCOL_FILES if n in files and n not in kept]
    archive = manifest["archive"]
    if NAMES_FILE in added:     # the per-person counts could not be checked before
        counts = Counter(n.split("/")[0] for n in manifest["image_files"])
        check_counts(counts, root / NAMES_FILE, manifest["files"][archive]["source"])
    manifest["files"] = {archive: manifest["files"][archive]} | protocol_entries(root, files)
    manifest["missing"] = [n for n in PROTOCOL_FILES if n not in files]
    write_manifest(root, manifest)
    print(f"images unchanged ({summary}); added {', '.join(added) or 'no protocol file'}; "
          f"{len(files)} of {len(PROTOCOL_FILES)} protocol files"
          + (f" (missing: {', '.join(manifest['missing'])})" if manifest["missing"] else ""))


def install(args, root):
    """Get the archive and the protocol files, extract and verify the images, write the manifest."""
    (root / "manifest.json").unlink(missing_ok=True)
    if not args.archive:
        args.variant = args.variant or "deepfunneled"
    dead_hosts = set()
    archive, archive_source, archive_sha = get_archive(args, root, dead_hosts)
    files = get_protocol_files(args, root, dead_hosts)

    names_file = root / NAMES_FILE if NAMES_FILE in files else None
    # A downloaded archive is the variant we asked for; a local one must not contradict --variant.
    counts, folder = install_images(archive, root, names_file,
                                    args.variant if args.archive else None)
    variant = (args.variant or guess_variant(folder) or guess_variant(archive.name)
               or "deepfunneled")

    missing = [n for n in PROTOCOL_FILES if n not in files]
    archive_entry = {"source": archive_source, "sha256": archive_sha,
                     "size": archive.stat().st_size}
    manifest = {
        "variant": variant,
        "people": len(counts),
        "images": sum(counts.values()),
        "archive": archive.name,
        "files": {archive.name: archive_entry} | protocol_entries(root, files),
        "missing": missing,
        "image_files": image_entries(root / "images"),
    }
    write_manifest(root, manifest)
    print(f"done: {manifest['images']} images of {manifest['people']} people ({variant}) in "
          f"{root / 'images'}; {len(files)} of {len(PROTOCOL_FILES)} protocol files"
          + (f" (missing: {', '.join(missing)})" if missing else ""))


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (DataError, OSError) as e:    # OSError: e.g. a full disk or an unwritable --root
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
