"""download_data.py against a real HTTP server on 127.0.0.1 serving a tiny synthetic LFW."""

import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import download_data as dl

PEOPLE = {"Alice_Smith": 2, "Bob_Jones": 1, "Carol_White": 3}
N_IMAGES = sum(PEOPLE.values())


# ---------------------------------------------------------------- synthetic LFW

def jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, "JPEG")
    return buf.getvalue()


def image_members(top):
    """{archive path: bytes} for the synthetic people under folder TOP."""
    members = {}
    for i, (name, n) in enumerate(PEOPLE.items()):
        for k in range(1, n + 1):
            members[f"{top}/{name}/{name}_{k:04d}.jpg"] = jpeg((40 * i, 20 * k, 100))
    return members


def make_tgz(members, extra=()):
    """EXTRA: ready TarInfo objects (links, odd names) added as they are."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.size else None)
    return buf.getvalue()


def make_zip(members, extra=()):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
    return buf.getvalue()


def protocol_files(people=PEOPLE):
    names = "".join(f"{n}\t{c}\n" for n, c in people.items())
    return {
        "lfw-names.txt": names.encode(),
        "pairs.txt": b"1\t1\nAlice_Smith\t1\t2\nAlice_Smith\t1\tBob_Jones\t1\n",
        "pairsDevTrain.txt": b"1\nCarol_White\t1\t3\nCarol_White\t2\tBob_Jones\t1\n",
        "pairsDevTest.txt": b"1\nAlice_Smith\t1\t2\nBob_Jones\t1\tCarol_White\t3\n",
        "people.txt": b"1\n3\n" + names.encode(),
        "peopleDevTrain.txt": b"2\nAlice_Smith\t2\nCarol_White\t3\n",
        "peopleDevTest.txt": b"1\nBob_Jones\t1\n",
    }


def sha(data):
    return hashlib.sha256(data).hexdigest()


TGZ = make_tgz(image_members("lfw-deepfunneled"))
ZIP = make_zip(image_members("images_deepfunneled"))   # GitHub zips may name the folder otherwise
PROTOCOL = protocol_files()


# ---------------------------------------------------------------- test server

class Handler(BaseHTTPRequestHandler):
    """Serves state.files, honours Range, and can cut a response half-way once."""

    def do_GET(self):
        state = self.server.state
        rng = self.headers.get("Range")
        state["requests"].append((self.path, rng))
        data = state["files"].get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not state["ignore_range"]:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in state["cut"]:          # a dropped connection, half-way
            state["cut"].discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def github_style_source(base):
    names = ("lfw-deepfunneled.zip",) + dl.PROTOCOL_FILES
    return {"name": "test", "base": base, "archives": {"deepfunneled": "lfw-deepfunneled.zip"},
            "files": {n: n for n in names}}


@pytest.fixture
def server(http_server, monkeypatch):
    """GitHub-Pages-style site at /gh/; checksum tables hold the synthetic protocol files' sums."""
    state = {"files": {f"/gh/{n}": d for n, d in PROTOCOL.items()}, "requests": [],
             "cut": set(), "ignore_range": False}
    state["files"]["/gh/lfw-deepfunneled.zip"] = ZIP
    http_server.state = state
    base = f"http://127.0.0.1:{http_server.server_address[1]}"
    monkeypatch.setattr(dl, "SOURCES", [github_style_source(base + "/gh/")])
    monkeypatch.setattr(dl, "SHA256", {n: sha(d) for n, d in PROTOCOL.items()})
    monkeypatch.setattr(dl, "MD5", {})
    monkeypatch.setattr(dl, "BACKOFF", 0)
    monkeypatch.setattr(dl, "TIMEOUT", 5)
    state["base"] = base
    return state


@pytest.fixture
def local(tmp_path, monkeypatch):
    """Synthetic archive + protocol dir on disk; the network points at a closed port."""
    src = tmp_path / "src"
    src.mkdir()
    for name, data in PROTOCOL.items():
        (src / name).write_bytes(data)
    (src / "lfw-deepfunneled.tgz").write_bytes(TGZ)
    monkeypatch.setattr(dl, "SOURCES", [github_style_source(closed_port_url())])
    monkeypatch.setattr(dl, "SHA256", {n: sha(d) for n, d in PROTOCOL.items()})
    monkeypatch.setattr(dl, "MD5", {})
    monkeypatch.setattr(dl, "BACKOFF", 0)
    return src


def run(*argv):
    return dl.main([str(a) for a in argv])


def assert_layout(root, n_protocol=7):
    images = root / "images"
    assert sorted(p.name for p in images.iterdir()) == sorted(PEOPLE)
    for name, n in PEOPLE.items():
        assert sorted(p.name for p in (images / name).iterdir()) == \
            [f"{name}_{k:04d}.jpg" for k in range(1, n + 1)]
    manifest = json.loads((root / "manifest.json").read_text())
    assert (manifest["people"], manifest["images"]) == (len(PEOPLE), N_IMAGES)
    assert manifest["variant"] == "deepfunneled"
    present = [n for n in dl.PROTOCOL_FILES if (root / n).exists()]
    assert len(present) == n_protocol
    for name in present:
        assert manifest["files"][name]["sha256"] == sha((root / name).read_bytes())
        assert manifest["files"][name]["size"] == (root / name).stat().st_size
    # A size and a hash for exactly the images on disk.
    on_disk = {p.relative_to(images).as_posix(): p.read_bytes() for p in images.rglob("*.jpg")}
    assert manifest["image_files"] == {
        n: {"size": len(d), "sha256": sha(d)} for n, d in sorted(on_disk.items())}
    assert not list(root.glob(".tmp-*"))
    return manifest


def assert_nothing_installed(root):
    assert not (root / "images").exists()
    assert not (root / "manifest.json").exists()
    assert not list(root.glob(".tmp-*"))


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("variant, urls", [
    ("deepfunneled", ["https://umass-vis-lfw.github.io/lfw-deepfunneled.zip",
                      "http://vis-www.cs.umass.edu/lfw/lfw-deepfunneled.tgz"]),
    ("original", ["https://umass-vis-lfw.github.io/lfw.zip",
                  "https://ndownloader.figshare.com/files/5976018",
                  "http://vis-www.cs.umass.edu/lfw/lfw.tgz"]),
])
def test_default_sources_tried_in_order(tmp_path, monkeypatch, variant, urls):
    # The real source table: GitHub Pages first, then figshare (which has no deepfunneled),
    # then UMass. Nothing goes on the network: every URL "answers" 404.
    tried = []

    def not_found(url, dest):
        tried.append(url)
        raise dl.FetchError(f"{url}: HTTP 404")

    monkeypatch.setattr(dl, "download", not_found)
    assert run("--root", tmp_path / "dataset", "--variant", variant) == 1
    assert tried == urls


def test_default_sums_are_enforced(tmp_path, monkeypatch, capsys):
    # The real checksum table rejects a deepfunneled archive that is not the published one...
    def serve_synthetic(url, dest):
        dest.write_bytes(TGZ)

    monkeypatch.setattr(dl, "download", serve_synthetic)
    monkeypatch.setattr(dl, "SOURCES", [s for s in dl.SOURCES if "umass.edu" in s["base"]])
    root = tmp_path / "dataset"
    assert run("--root", root) == 1
    err = capsys.readouterr().err
    assert "checksum mismatch for lfw-deepfunneled.tgz" in err and "6deb87cb" in err
    assert_nothing_installed(root)
    # ...and every protocol file and archive has a known sum, so none is taken unchecked.
    for name in dl.PROTOCOL_FILES + ("lfw.tgz", "lfw-funneled.tgz", "lfw-deepfunneled.tgz"):
        (tmp_path / name).write_bytes(b"not the real " + name.encode())
        with pytest.raises(dl.DataError, match=f"checksum mismatch for {name}"):
            dl.verify(tmp_path / name, name, "fix")


def test_download_zip_from_server(server, tmp_path, capsys):
    root = tmp_path / "dataset"
    assert run("--root", root) == 0
    manifest = assert_layout(root)
    assert manifest["files"]["lfw-deepfunneled.zip"]["source"] == \
        server["base"] + "/gh/lfw-deepfunneled.zip"
    assert manifest["files"]["pairs.txt"]["source"] == server["base"] + "/gh/pairs.txt"
    assert (root / "downloads" / "lfw-deepfunneled.zip").read_bytes() == ZIP
    assert (root / "pairs.txt").read_bytes() == PROTOCOL["pairs.txt"]
    assert "done: 6 images of 3 people" in capsys.readouterr().out


def test_falls_back_to_next_source(server, tmp_path, monkeypatch):
    # The first source lacks the archive (404); the second has a tgz with a known sum.
    del server["files"]["/gh/lfw-deepfunneled.zip"]
    server["files"]["/fs/123"] = TGZ
    mirror = {"name": "mirror", "base": server["base"] + "/fs/",
              "archives": {"deepfunneled": "lfw-deepfunneled.tgz"},
              "files": {"lfw-deepfunneled.tgz": "123"}}
    monkeypatch.setattr(dl, "SOURCES", dl.SOURCES + [mirror])
    monkeypatch.setitem(dl.SHA256, "lfw-deepfunneled.tgz", sha(TGZ))
    root = tmp_path / "dataset"
    assert run("--root", root) == 0
    manifest = assert_layout(root)
    assert manifest["files"]["lfw-deepfunneled.tgz"]["source"] == server["base"] + "/fs/123"


def test_resume_after_cut_connection(server, tmp_path):
    server["cut"].add("/gh/lfw-deepfunneled.zip")
    root = tmp_path / "dataset"
    assert run("--root", root) == 0
    zips = [r for p, r in server["requests"] if p == "/gh/lfw-deepfunneled.zip"]
    assert zips == [None, f"bytes={len(ZIP) // 2}-"]
    assert (root / "downloads" / "lfw-deepfunneled.zip").read_bytes() == ZIP
    assert not (root / "downloads" / "lfw-deepfunneled.zip.part").exists()
    assert_layout(root)


def test_resume_restarts_when_server_ignores_range(server, tmp_path):
    server["ignore_range"] = True
    downloads = tmp_path / "dataset" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "lfw-deepfunneled.zip.part").write_bytes(b"stale bytes")
    assert run("--root", tmp_path / "dataset") == 0
    zips = [r for p, r in server["requests"] if p == "/gh/lfw-deepfunneled.zip"]
    assert zips == ["bytes=11-"]            # asked to resume, got 200, so rewrote from zero
    assert (downloads / "lfw-deepfunneled.zip").read_bytes() == ZIP


def test_protocol_checksum_mismatch(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dl.SHA256, "pairs.txt", "0" * 64)
    root = tmp_path / "dataset"
    assert run("--root", root) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert "pairs.txt" in err and "checksum mismatch" in err and "0" * 64 in err
    assert_nothing_installed(root)
    assert not (root / "pairs.txt").exists()             # the bad file is not left in ROOT
    assert (root / "downloads" / "lfw-deepfunneled.zip").exists()   # the archive is kept


def test_archive_checksum_mismatch(local, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(dl.SHA256, "lfw-deepfunneled.tgz", "f" * 64)
    root = tmp_path / "dataset"
    assert run("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local,
               "--root", root) == 1
    err = capsys.readouterr().err
    assert "lfw-deepfunneled.tgz" in err and "check --archive" in err
    assert_nothing_installed(root)


def test_local_archive_and_protocol_dir(local, tmp_path):
    root = tmp_path / "dataset"
    assert run("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local,
               "--root", root) == 0
    manifest = assert_layout(root)
    assert manifest["files"]["lfw-deepfunneled.tgz"]["source"] == \
        str((local / "lfw-deepfunneled.tgz").resolve())
    assert manifest["files"]["people.txt"]["source"] == str((local / "people.txt").resolve())
    assert not (root / "downloads").exists()


@pytest.mark.parametrize("top", ["lfw", "lfw_funneled", "lfw-deepfunneled/lfw-deepfunneled", None])
def test_archive_layouts(local, tmp_path, top):
    members = image_members(top or "x")
    if top is None:     # no top folder at all
        members = {k[2:]: v for k, v in members.items()}
    archive = tmp_path / "any.tar"
    archive.write_bytes(make_tgz(members))
    assert run("--archive", archive, "--protocol-dir", local, "--root", tmp_path / "d") == 0
    images = tmp_path / "d" / "images"
    assert sum(1 for _ in images.rglob("*.jpg")) == N_IMAGES


def symlink_tar():
    info = tarfile.TarInfo("lfw/Alice_Smith/link.jpg")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


def traversal_tar():
    info = tarfile.TarInfo("../evil.jpg")
    info.size = 4
    return info


def absolute_tar():
    info = tarfile.TarInfo("/tmp/evil-lfw-test.jpg")
    info.size = 4
    return info


def symlink_zip():
    info = zipfile.ZipInfo("lfw/Alice_Smith/link.jpg")
    info.external_attr = 0o120777 << 16
    return info, b"../../../evil.jpg"


@pytest.mark.parametrize("kind", ["tgz-dotdot", "tgz-absolute", "tgz-symlink",
                                  "zip-dotdot", "zip-symlink"])
def test_unsafe_members_rejected(local, tmp_path, kind, capsys):
    members = image_members("lfw")
    if kind.startswith("tgz"):
        extra = {"tgz-dotdot": traversal_tar, "tgz-absolute": absolute_tar,
                 "tgz-symlink": symlink_tar}[kind]()
        archive = tmp_path / "bad.tgz"
        archive.write_bytes(make_tgz(members, [extra]))
    else:
        extra = symlink_zip() if kind == "zip-symlink" else ("../evil.jpg", b"evil")
        archive = tmp_path / "bad.zip"
        archive.write_bytes(make_zip(members, [extra]))
    root = tmp_path / "work" / "dataset"
    assert run("--archive", archive, "--protocol-dir", local, "--root", root) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to extract" in err and str(archive) in err
    assert_nothing_installed(root)
    assert not list(tmp_path.rglob("evil.jpg"))
    assert not Path("/tmp/evil-lfw-test.jpg").exists()


def test_rerun_does_nothing(server, tmp_path, capsys):
    root = tmp_path / "dataset"
    assert run("--root", root) == 0
    image = root / "images" / "Alice_Smith" / "Alice_Smith_0001.jpg"
    before = image.stat()
    n_requests = len(server["requests"])
    capsys.readouterr()
    assert run("--root", root) == 0
    assert "is complete and verified (6 images of 3 people); nothing to do" in \
        capsys.readouterr().out
    after = image.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(server["requests"]) == n_requests
    # --force does it all again.
    assert run("--root", root, "--force") == 0
    assert image.stat().st_ino != before.st_ino
    assert len(server["requests"]) > n_requests
    assert_layout(root)


def test_rerun_after_damage_redoes(local, tmp_path):
    root = tmp_path / "dataset"
    args = ("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local, "--root", root)
    assert run(*args) == 0
    (root / "images" / "Bob_Jones" / "Bob_Jones_0001.jpg").unlink()
    assert run(*args) == 0
    assert_layout(root)


@pytest.mark.parametrize("fmt", ["tgz", "zip"])
def test_truncated_archive(local, tmp_path, fmt, capsys):
    data = TGZ if fmt == "tgz" else ZIP
    archive = tmp_path / f"lfw-deepfunneled.{fmt}"
    archive.write_bytes(data[: len(data) * 2 // 3])
    root = tmp_path / "dataset"
    assert run("--archive", archive, "--protocol-dir", local, "--root", root) == 1
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and str(archive) in err and "re-download" in err
    assert_nothing_installed(root)


def test_count_mismatch(local, tmp_path, monkeypatch, capsys):
    wrong = dict(PEOPLE, Carol_White=4)
    (local / "lfw-names.txt").write_bytes(protocol_files(wrong)["lfw-names.txt"])
    monkeypatch.delitem(dl.SHA256, "lfw-names.txt")
    root = tmp_path / "dataset"
    assert run("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local,
               "--root", root) == 1
    err = capsys.readouterr().err
    assert "do not match lfw-names.txt" in err and "Carol_White: 3 images, expected 4" in err
    assert_nothing_installed(root)


def test_no_names_file_skips_count_check(local, tmp_path, capsys):
    (local / "lfw-names.txt").unlink()
    root = tmp_path / "dataset"
    assert run("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local,
               "--root", root) == 0
    assert "cannot check the image counts" in capsys.readouterr().err
    assert_layout(root, n_protocol=6)


def test_no_network(tmp_path, monkeypatch, capsys):
    dead = closed_port_url()
    monkeypatch.setattr(dl, "SOURCES", [github_style_source(dead),
                                        dict(github_style_source(dead + "mirror/"))])
    monkeypatch.setattr(dl, "BACKOFF", 0)
    root = tmp_path / "dataset"
    assert run("--root", root) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--archive" in err and "kaggle.com/datasets/jessicali9530/lfw-dataset" in err
    assert_nothing_installed(root)


def test_missing_protocol_file_is_a_warning(server, tmp_path, capsys):
    del server["files"]["/gh/peopleDevTest.txt"]
    root = tmp_path / "dataset"
    assert run("--root", root) == 0
    assert "peopleDevTest.txt" in capsys.readouterr().err
    manifest = assert_layout(root, n_protocol=6)
    assert manifest["missing"] == ["peopleDevTest.txt"]
    # A 404 is not retried.
    assert [p for p, _ in server["requests"]].count("/gh/peopleDevTest.txt") == 1


def image_stamp(root):
    """(inode, mtime) of every image: unchanged means the images were not extracted again."""
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (root / "images").rglob("*.jpg")}


def test_rerun_adds_missing_protocol_files_from_dir(local, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("pairs.txt", "people.txt"):
        (partial / name).write_bytes(PROTOCOL[name])
    root = tmp_path / "dataset"
    archive = local / "lfw-deepfunneled.tgz"
    assert run("--archive", archive, "--protocol-dir", partial, "--root", root) == 0
    assert len(json.loads((root / "manifest.json").read_text())["missing"]) == 5
    before = image_stamp(root)
    capsys.readouterr()
    assert run("--archive", archive, "--protocol-dir", local, "--root", root) == 0
    out = capsys.readouterr().out
    assert "nothing to do" not in out and "added pairsDevTrain.txt" in out
    manifest = assert_layout(root)          # all seven now, in the manifest too
    assert manifest["missing"] == []
    assert manifest["files"]["lfw-names.txt"]["source"] == str((local / "lfw-names.txt").resolve())
    assert manifest["files"]["pairs.txt"]["source"] == str((partial / "pairs.txt").resolve())
    assert image_stamp(root) == before      # the images were not extracted again


def test_rerun_fetches_only_missing_protocol_files(server, tmp_path):
    held_back = {n: server["files"].pop(f"/gh/{n}") for n in ("people.txt", "lfw-names.txt")}
    root = tmp_path / "dataset"
    assert run("--root", root) == 0
    assert_layout(root, n_protocol=5)
    before = image_stamp(root)
    server["files"].update({f"/gh/{n}": d for n, d in held_back.items()})
    server["requests"].clear()
    assert run("--root", root) == 0
    assert sorted(p for p, _ in server["requests"]) == ["/gh/lfw-names.txt", "/gh/people.txt"]
    assert assert_layout(root)["missing"] == []
    assert image_stamp(root) == before


def test_late_names_file_still_checks_counts(local, tmp_path, monkeypatch, capsys):
    # Without lfw-names.txt the counts went unchecked; when it arrives they are checked.
    names = local / "lfw-names.txt"
    names.unlink()
    root = tmp_path / "dataset"
    args = ("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local, "--root", root)
    assert run(*args) == 0
    names.write_bytes(protocol_files(dict(PEOPLE, Carol_White=4))["lfw-names.txt"])
    monkeypatch.delitem(dl.SHA256, "lfw-names.txt")
    capsys.readouterr()
    assert run(*args) == 1
    assert "Carol_White: 3 images, expected 4" in capsys.readouterr().err
    assert "lfw-names.txt" not in json.loads((root / "manifest.json").read_text())["files"]


def test_rerun_repairs_a_damaged_protocol_file_only(local, tmp_path, capsys):
    root = tmp_path / "dataset"
    args = ("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local, "--root", root)
    assert run(*args) == 0
    before = image_stamp(root)
    (root / "pairs.txt").write_bytes(b"1\t1\n")
    capsys.readouterr()
    assert run(*args) == 0
    assert f"{root / 'pairs.txt'} does not match" in capsys.readouterr().err
    assert (root / "pairs.txt").read_bytes() == PROTOCOL["pairs.txt"]
    assert image_stamp(root) == before
    assert_layout(root)


def damage_truncate(images):
    path = images / "Alice_Smith" / "Alice_Smith_0001.jpg"
    path.write_bytes(path.read_bytes()[:100])
    return ["Alice_Smith/Alice_Smith_0001.jpg has 100 bytes"]


def damage_swap(images):
    # One image deleted and another added: the counts still match.
    (images / "Bob_Jones" / "Bob_Jones_0001.jpg").unlink()
    (images / "Carol_White" / "Carol_White_0004.jpg").write_bytes(jpeg((1, 2, 3)))
    return ["Bob_Jones/Bob_Jones_0001.jpg is missing",
            "Carol_White/Carol_White_0004.jpg is not in the manifest"]


@pytest.mark.parametrize("damage", [damage_truncate, damage_swap])
def test_rerun_detects_damaged_images(local, tmp_path, capsys, damage):
    root = tmp_path / "dataset"
    args = ("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local, "--root", root)
    assert run(*args) == 0
    good = {p: p.read_bytes() for p in (root / "images").rglob("*.jpg")}
    expected = damage(root / "images")
    capsys.readouterr()
    assert run(*args) == 0
    out, err = capsys.readouterr()
    assert "nothing to do" not in out
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("warning: ") and "extracting the images again" in err
    for problem in expected:
        assert problem in err
    assert {p: p.read_bytes() for p in (root / "images").rglob("*.jpg")} == good
    assert_layout(root)


def test_verify_checks_hashes(local, tmp_path, capsys):
    root = tmp_path / "dataset"
    args = ("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", local, "--root", root)
    assert run(*args) == 0
    path = root / "images" / "Carol_White" / "Carol_White_0002.jpg"
    good = path.read_bytes()
    path.write_bytes(bytes(len(good)))          # same size, other bytes
    capsys.readouterr()
    assert run(*args) == 0                      # sizes only: not seen
    assert "nothing to do" in capsys.readouterr().out
    assert path.read_bytes() != good
    assert run(*args, "--verify") == 0
    err = capsys.readouterr().err
    assert "Carol_White/Carol_White_0002.jpg has changed (SHA-256 differs)" in err
    assert path.read_bytes() == good
    assert run(*args, "--verify") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_missing_protocol_dir_is_an_error(local, tmp_path, capsys):
    root = tmp_path / "dataset"
    missing = tmp_path / "no-such-dir"
    assert run("--archive", local / "lfw-deepfunneled.tgz", "--protocol-dir", missing,
               "--root", root) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert str(missing) in err and "--protocol-dir" in err
    assert_nothing_installed(root)


def test_other_archive_on_existing_data_is_reported(local, tmp_path, capsys):
    root = tmp_path / "dataset"
    first = local / "lfw-deepfunneled.tgz"
    assert run("--archive", first, "--protocol-dir", local, "--root", root) == 0
    before = image_stamp(root)
    copy = tmp_path / "copy" / "lfw-deepfunneled.tgz"   # the same bytes elsewhere: no note
    copy.parent.mkdir()
    copy.write_bytes(TGZ)
    for same in (first, copy):
        capsys.readouterr()
        assert run("--archive", same, "--protocol-dir", local, "--root", root) == 0
        assert capsys.readouterr().err == ""
    other = tmp_path / "lfw-funneled.zip"
    other.write_bytes(make_zip(image_members("lfw_funneled")))
    assert run("--archive", other, "--protocol-dir", local, "--root", root) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning: ")
    assert str(first.resolve()) in err and str(other) in err and "--force" in err
    assert image_stamp(root) == before
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["files"]["lfw-deepfunneled.tgz"]["source"] == str(first.resolve())


@pytest.mark.parametrize("name, data, real", [
    ("lfw-deepfunneled.tgz", ZIP, "lfw-deepfunneled.zip"),
    ("lfw-deepfunneled.zip", TGZ, "lfw-deepfunneled.tgz"),
])
def test_archive_named_as_the_wrong_format(local, tmp_path, capsys, name, data, real):
    archive = tmp_path / name
    archive.write_bytes(data)
    root = tmp_path / "dataset"
    assert run("--archive", archive, "--protocol-dir", local, "--root", root) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    kind = "zip" if real.endswith(".zip") else "tar"
    assert str(archive) in err and f"really a {kind} archive" in err
    assert f"rename it to {real}" in err
    assert_nothing_installed(root)


def test_not_an_archive_is_one_line(local, tmp_path, capsys):
    archive = tmp_path / "lfw-deepfunneled.tgz"
    archive.write_bytes(b"<html>Not Found</html>" * 20)
    assert run("--archive", archive, "--protocol-dir", local, "--root", tmp_path / "d") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(archive) in err and "re-download" in err


@pytest.mark.skipif(not os.environ.get("LFW_DIR"),
                    reason="LFW_DIR not set: real-LFW tests need the archive, "
                           "e.g. LFW_DIR=../shared/data/lfw")
def test_real_lfw(lfw_root):
    manifest = json.loads((lfw_root / "manifest.json").read_text())
    assert (manifest["images"], manifest["people"]) == (13233, 5749)
    people = [p for p in (lfw_root / "images").iterdir() if p.is_dir()]
    assert len(people) == 5749
    assert sum(len(os.listdir(p)) for p in people) == 13233
    for name in dl.PROTOCOL_FILES:
        assert manifest["files"][name]["sha256"] == dl.SHA256[name]
        assert (lfw_root / name).is_file()
