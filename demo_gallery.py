"""The galleries the "Who is this?" page searches: a <person>/<photo> folder (LFW_DEMO_GALLERY,
or LFW's own people) through identify.py, its embeddings cached beside the photos, or the
people enrolled on the page, embedded by the chosen FaceModel. Either is the gallery
identify.answer_queries searches: people, photos, person_of, members, matrix, warnings,
n_new, n_files, folder.

People enrolled by upload are st.session_state["enrolled"], a list of
{"person": str, "name": str, "data": bytes}, at most MAX_ENROLLED long; like all session
state it is gone when the page is reloaded.
"""
import hashlib
import time
from pathlib import Path
from types import SimpleNamespace

import streamlit as st
import torch

import demo
import faces
import identify

# A folder gallery with more new photos than this is embedded only when asked: LFW's 13,233
# take minutes of CPU the first time, which a visit to the page should not start by itself.
CONFIRM_OVER = 500
# Photos one session may enrol: each is held in memory (up to MAX_MB) until the session ends,
# so a session holds at most 20 x 20 MB of them, however long the page stays open.
MAX_ENROLLED = 20
# A photo whose status changed this recently may change again without its stamp changing
# (file times tick every few milliseconds); a folder gallery holding one is hashed again.
STAMP_SETTLE_NS = 2_000_000_000


def gallery_sources():
    """{label: folder or None} of the galleries on offer, the first the default: the
    LFW_DEMO_GALLERY folder (set on purpose, so it leads), LFW's people when the copy is
    there, and people enrolled on this page (None), always."""
    sources, env, data = {}, demo.gallery_env(), demo.data_dir()
    if env:
        sources[f"Folder {env}"] = env
    if (data / "images").is_dir():
        sources[f"LFW people ({data / 'images'})"] = data / "images"
    sources["People I enrol here"] = None
    return sources


# ------------------------------------------------------------------ a folder

@st.cache_resource
def gallery_store():
    """Loaded folder galleries, {key: gallery}, the last two, shared by every session: a
    rerun (a slider moved, a photo given) must not hash a 13,233-photo folder again."""
    return {}


@st.cache_resource
def gallery_stamps():
    """{(folder, checkpoint sha): (file_stamps, key)} as they were when the folder's photos
    were last hashed, shared by every session: unchanged stamps mean unchanged photos."""
    return {}


def file_stamps(files):
    """(each photo's device, inode, size, mtime and ctime (None when stat fails), settled).
    Size and mtime alone miss a photo replaced by one of the same size with its mtime kept
    (cp -p, touch -r); ctime cannot be set back, so a photo rewritten or moved into place gets
    a new stamp, as git's index notices it. settled is False when a ctime is under
    STAMP_SETTLE_NS old: the clock that sets it ticks coarsely, so a photo changed again
    within the same tick would keep its stamp (git's "racy" files); such stamps are not
    trusted."""
    stamps, now, settled = [], time.time_ns(), True
    for _, p in files:
        try:
            s = p.stat()
            stamps.append((str(p), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns))
            settled = settled and now - s.st_ctime_ns > STAMP_SETTLE_NS
        except OSError:  # gone since the listing: load_gallery warns about it
            stamps.append((str(p), None))
    return stamps, settled


def content_key(folder, hashes, ckpt_sha):
    """What a loaded folder gallery depends on: the checkpoint and every photo's path and
    content hash (identify's, by which its cache keys the embeddings)."""
    digest = hashlib.sha256()
    for path, sha in sorted((str(p), h) for p, h in hashes.items()):
        digest.update(f"{path}\0{sha}\n".encode())
    return f"{Path(folder).resolve()}:{ckpt_sha}:{digest.hexdigest()}"


def unchanged(gallery):
    """A stored gallery as this run reports it: nothing embedded now."""
    return SimpleNamespace(**{**vars(gallery), "n_new": 0})


def folder_gallery(folder, fm):
    """identify.py's gallery of a <person>/<photo> folder for the model fm, its cache beside
    it brought up to date (with a progress bar, and after a button press when there are many
    new photos). Returns (gallery, key), the gallery None while it waits for the button;
    IdentifyError if the folder is unusable."""
    files = identify.gallery_files(folder)
    (stamps, settled), store, seen = file_stamps(files), gallery_store(), gallery_stamps()
    where = (str(Path(folder).resolve()), fm.sha256)
    if seen.get(where, (None, None))[0] == stamps and seen[where][1] in store:
        key = seen[where][1]  # no photo changed since it was hashed: none is read again
        return unchanged(store[key]), key
    with st.spinner(f"Reading the {len(files):,} photos of {folder}…"):
        state = identify.gallery_state(folder, files, fm)  # hashes each photo once
    key = content_key(folder, state[0], fm.sha256)
    seen.pop(where, None)
    while len(seen) >= 4:
        seen.pop(next(iter(seen)))
    if settled:  # else the next run hashes the photos again
        seen[where] = (stamps, key)
    if key in store:  # touched, not changed: the same photos
        return unchanged(store[key]), key
    todo = state[4]
    if len(todo) > CONFIRM_OVER and not st.session_state.get(f"embed:{key}"):
        st.info(f"{len(todo):,} of the gallery's {len(files):,} photos are not embedded yet "
                "for this checkpoint. That takes minutes on a CPU, once: the embeddings are "
                f"then cached beside the photos ({identify.cache_path(folder, fm.sha256).name}).")
        if st.button(f"Embed {len(todo):,} photos"):
            st.session_state[f"embed:{key}"] = True
            st.rerun()
        return None, key
    bar = st.progress(0.0, text=f"Embedding the gallery: 0 of {len(todo):,} new photos…") \
        if todo else None

    def progress(done, total):  # a first LFW gallery takes minutes: show where it is
        bar.progress(done / total, text=f"Embedding the gallery: {done:,} of {total:,} new "
                                        "photos…")
    gallery = identify.load_gallery(folder, files, fm, state=state,
                                    progress=progress if todo else None)
    if bar is not None:
        bar.empty()
    while len(store) >= 2:
        store.pop(next(iter(store)))
    store[key] = gallery
    return gallery, key


# ------------------------------------------------------------------ people enrolled here

@st.cache_data(max_entries=256, show_spinner="Embedding the gallery photo…")
def enrolled_embedding(data, name, path, mtime):
    """(embedding (1, d), None) of an enrolled photo's face, or (None, why not): the face
    demo.analyse finds, embedded by the model as a folder gallery's photos are. Cached per
    checkpoint, so a rerun embeds nothing; errors are returned, not raised, so that the
    cache keeps them."""
    fm = demo.face_model(path, mtime)
    result = demo.analyse(data, name, faces.UPLOAD_RULE, demo.crop_key(fm), fm)
    if result["error"]:
        return None, result["error"]
    return fm.embed([result["crop"]]), None


def enrolled_gallery(enrolled, path, mtime):
    """The enrolled people as an identify.py gallery, keyed by what it is made of: (gallery,
    key); each photo is "enrolled:<index>" in it. IdentifyError when no photo has a face."""
    people, person_of, rows, photos, warnings = [], [], [], [], []
    for i, entry in enumerate(enrolled):
        emb, error = enrolled_embedding(entry["data"], entry["name"], path, mtime)
        if emb is None:  # had a face under another checkpoint's crop settings
            warnings.append(f"{entry['person']}: skipped, {error}")
            continue
        if entry["person"] not in people:
            people.append(entry["person"])
        person_of.append(people.index(entry["person"]))
        rows.append(emb)
        photos.append(f"enrolled:{i}")
    if not rows:
        raise identify.IdentifyError("No face found in any enrolled photo for this checkpoint; "
                                     "enrol photos where the face is clearly visible")
    fm, person_of = demo.face_model(path, mtime), torch.tensor(person_of)
    gallery = SimpleNamespace(
        folder=None, people=people, photos=photos, person_of=person_of,
        members=[torch.nonzero(person_of == i).flatten() for i in range(len(people))],
        matrix=fm.prepare_gallery(torch.cat(rows)), warnings=warnings, n_new=0,
        n_files=len(enrolled))
    key = (fm.sha256, tuple((e["person"], hashlib.sha256(e["data"]).hexdigest())
                            for e in enrolled))
    return gallery, key
