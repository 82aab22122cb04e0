"""The "Who is this?" page: every face of a photo searched among the people of a gallery, as
identify.py answers a query (identify.answer_queries with the chosen FaceModel), each face
boxed with its top people, their thumbnails and scores, or "unknown" below the threshold.
The galleries are demo_gallery.py's: a folder, LFW's people, or people enrolled here.
"""
from pathlib import Path

import streamlit as st
from PIL import Image, ImageDraw

import demo
import demo_gallery
import faces
import identify
from demo import display_name
from demo_gallery import MAX_ENROLLED

TOP = 5          # people shown per face, as identify.py's --top default
THUMB = 110      # match thumbnails' side in pixels: five fit in a row beside the photo
BOX_COLOURS = ((0, 255, 0), (255, 170, 0), (0, 170, 255), (255, 0, 255), (255, 255, 0))


# ------------------------------------------------------------------ the gallery

def on_enrol(key, path, mtime):
    """Add the chosen photo under the typed name, once its face is found; else say why."""
    upload, person = st.session_state.get(key), st.session_state.get("enrol_name", "").strip()
    error = None
    if len(st.session_state.get("enrolled", [])) >= MAX_ENROLLED:
        error = (f"The gallery holds {MAX_ENROLLED} photos, the most one session enrols; press "
                 "“Remove everyone” to start over, or for more people start the app with "
                 "LFW_DEMO_GALLERY set to a folder of <person>/<photo> files.")
    elif upload is None:
        error = "Choose a photo of the person first, then press “Add to gallery”."
    elif not person:
        error = f"Type the name of the person in {upload.name} first."
    else:
        data, fm = upload.getvalue(), demo.face_model(path, mtime)
        error = demo.analyse(data, upload.name, faces.UPLOAD_RULE, demo.crop_key(fm), fm)["error"]
    st.session_state["enrol_error"] = error
    if error:
        return
    st.session_state.setdefault("enrolled", []).append(
        {"person": person, "name": upload.name, "data": data})
    st.session_state["enrol_name"] = ""
    st.session_state["enrol_nonce"] = st.session_state.get("enrol_nonce", 0) + 1  # empties the box


def on_clear_enrolled():
    st.session_state["enrolled"] = []
    st.session_state.pop("enrol_error", None)


def enrol_form(path, mtime):
    """Name, photo and "Add to gallery"; then who is enrolled, with a button to start over."""
    nonce = st.session_state.get("enrol_nonce", 0)
    left, right = st.columns([1, 2])
    left.text_input("Name", key="enrol_name", placeholder="e.g. Eileen Collins")
    key = f"enrol_photo_{nonce}"
    right.file_uploader("Their photo", key=key, max_upload_size=demo.MAX_MB,
                        help=f"JPEG or PNG, up to {demo.MAX_MB} MB; its most prominent face is "
                             "used")
    st.button("Add to gallery", key="enrol", on_click=on_enrol, args=(key, path, mtime))
    if st.session_state.get("enrol_error"):
        st.error(st.session_state["enrol_error"])
    enrolled = st.session_state.get("enrolled", [])
    st.caption(f"Enrolled people live in this browser session only ({len(enrolled)} of at most "
               f"{MAX_ENROLLED} photos): reloading the page or restarting the app forgets them. "
               "For a gallery that lasts, start the app with LFW_DEMO_GALLERY set to a folder "
               "of <person>/<photo> files.")
    if enrolled:
        counts = {}
        for entry in enrolled:
            counts[entry["person"]] = counts.get(entry["person"], 0) + 1
        st.caption("Enrolled: " + ", ".join(f"{display_name(p)} ({n} photo{'s' if n > 1 else ''})"
                                            for p, n in counts.items()))
        st.button("Remove everyone", key="clear_enrolled", on_click=on_clear_enrolled)
    return enrolled


def pick_gallery(choice):
    """The gallery chooser and the chosen gallery: (gallery, key) or (None, None) with the
    reason on the page in one line."""
    sources = demo_gallery.gallery_sources()
    label = st.radio("Gallery: the people to search", list(sources), key="gallery_source",
                     horizontal=True)
    folder = sources[label]
    try:
        if folder is None:
            enrolled = enrol_form(choice.path, choice.mtime)
            if not enrolled:
                st.info("Enrol at least one person: type their name, choose their photo and "
                        "press “Add to gallery”. Add more photos under the same name to "
                        "enrol them more than once.")
                return None, None
            gallery, key = demo_gallery.enrolled_gallery(enrolled, choice.path, choice.mtime)
        else:
            gallery, key = demo_gallery.folder_gallery(folder, choice.model)
            if gallery is None:
                return None, None
    except (identify.IdentifyError, OSError) as e:
        st.error(f"{e}")
        return None, None
    show_gallery_summary(gallery)
    return gallery, key


def show_gallery_summary(gallery):
    """One line on the gallery, and the photos it left out, folded."""
    skipped = gallery.n_files - len(gallery.photos)
    line = (f"Gallery: {len(gallery.people):,} people in {len(gallery.photos):,} photos with "
            f"a face ({skipped:,} skipped)")
    if gallery.folder is not None:
        line += (f"; {gallery.n_new:,} photos embedded now, the others from the cache beside "
                 "the photos")
    st.caption(line + ".")
    if gallery.warnings:
        with st.expander(f"{len(gallery.warnings):,} gallery photo(s) left out"):
            for warning in gallery.warnings[:200]:
                st.text(warning)  # plain text: paths and names, unescaped


# ------------------------------------------------------------------ the answers

def draw_faces(image, boxes):
    """The photo, shrunk for display, with every face boxed and numbered as listed."""
    pil, scale = demo.shrunk(image)
    draw = ImageDraw.Draw(pil)
    line = max(2, round(max(pil.size) / 200))
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (c * scale for c in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        draw.text((x0 + line + 2, max(0, y0 - 12 - line)), str(i + 1), fill=colour)
    return pil


@st.cache_data(max_entries=16, show_spinner="Finding and identifying the faces…")
def identify_photo(data, name, gallery_key, _gallery, _fm):
    """Every face of the photo against the gallery, as identify.py answers a query: {error,
    display, faces: [{box, score, top: [{person, score, photo}]}]}. Keyed by the photo and
    gallery_key (what the gallery is made of, the checkpoint included); the threshold is
    applied by the caller, so moving the slider reruns no network."""
    try:
        image = demo.read_photo(data, name)
    except faces.FaceError as e:
        return {"error": str(e), "display": None, "faces": []}
    answer = identify.answer_queries([(name, image)], _fm, _gallery, TOP, float("inf"))[0]
    boxes = [f["box"] for f in answer["faces"]]
    error = None if boxes else (f"{name}: no face found; use a photo where the face is clearly "
                                "visible and roughly frontal")
    return {"error": error, "display": draw_faces(image, boxes), "faces": answer["faces"]}


@st.cache_data(max_entries=512, show_spinner=False)
def thumbnail(data):
    """A small copy of a gallery photo, or None if it no longer decodes. Decoded by
    faces.decode, as the photo was for its face: the one decoder that survives damaged files
    and makes 8-bit RGB of 16-bit and animated ones."""
    try:
        image = faces.decode(data, "thumbnail")
    except faces.FaceError:  # replaced since it was embedded; a missing thumbnail says enough
        return None
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil.thumbnail((THUMB, THUMB))
    return pil


def photo_bytes(photo):
    """The bytes of a gallery photo as answer_faces names it: a path, or "enrolled:<i>"."""
    if photo.startswith("enrolled:"):
        enrolled = st.session_state.get("enrolled", [])
        i = int(photo.split(":", 1)[1])
        return enrolled[i]["data"] if i < len(enrolled) else None
    if not demo.regular_file(photo):  # replaced by a FIFO since it was listed: never opened
        return None
    try:
        return Path(photo).read_bytes()
    except OSError:
        return None


def show_face_answer(number, face, threshold):
    """One face: the verdict (its best person, or unknown below the threshold), then its top
    people as thumbnails of their best-matching photo, with scores."""
    best = face["top"][0]
    who = display_name(best["person"])
    if best["score"] >= threshold:
        st.success(f"Face {number}: {who} (score {best['score']:.3f} ≥ threshold "
                   f"{threshold:.3f})")
    else:
        st.info(f"Face {number}: unknown (best score {best['score']:.3f}, {who}, is below the "
                f"threshold {threshold:.3f})")
    for col, (rank, match) in zip(st.columns(TOP), enumerate(face["top"], 1)):
        data = photo_bytes(match["photo"])
        thumb = thumbnail(data) if data else None
        if thumb is not None:
            col.image(thumb, width=THUMB)
        # Bold rank: a caption starting "1. " would be drawn as a numbered list, number hidden.
        col.caption(f"**{rank}.** {display_name(match['person'])}: {match['score']:.3f}")


def main():
    """Gallery, query photo, then each face's answer beside the photo with its faces boxed."""
    choice = demo.chosen()
    fm = choice.model
    gallery, gallery_key = pick_gallery(choice)
    st.divider()
    nonce = st.session_state.get("query_nonce", 0)
    query = st.file_uploader("Photo to identify", key=f"query_{nonce}", max_upload_size=demo.MAX_MB,
                             disabled=gallery is None,
                             help=f"JPEG or PNG, up to {demo.MAX_MB} MB and "
                                  f"{faces.MAX_PIXELS // 1_000_000} megapixels; every face in "
                                  "it is identified")
    if gallery is None or query is None:
        return
    result = identify_photo(query.getvalue(), query.name, gallery_key, gallery, fm)
    if result["error"]:
        st.error(result["error"])
    if result["display"] is None:
        return
    left, right = st.columns([2, 3])
    left.image(result["display"], caption=query.name)
    with right:
        if len(result["faces"]) > 1:
            st.caption(f"{len(result['faces'])} faces, numbered from the largest.")
        for number, face in enumerate(result["faces"], 1):
            show_face_answer(number, face, choice.threshold)
    st.caption(f"{demo.score_meaning(fm.ckpt['model_config'])} A person's score is that of "
               "their best-matching gallery photo; below the threshold the face is “unknown”.")


if __name__ == "__main__":  # st.navigation runs a page file as __main__; tests import it
    main()
