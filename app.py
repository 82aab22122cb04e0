"""Web demo: are the faces in two photos the same person? Run: streamlit run app.py

Page code only. Detection and alignment come from faces.py, the network and its score from
model.py and the LFW example pairs from dataset.py: the functions verify.py uses, so that the
page and the command line agree on the same photos.

LFW_DEMO_LOGS (default logs) is where the checkpoints are looked for and LFW_DEMO_DATA
(default dataset) is the LFW copy the example pairs come from; tests point them elsewhere.
The photos reach the page through st.session_state["photo_a"] / ["photo_b"] as
{"name": str, "data": bytes}: the upload boxes and the example button write them there.
"""
import io
import json
import os
import random
import warnings
from pathlib import Path

import pandas as pd
import streamlit as st
from PIL import Image, ImageDraw

import dataset
import faces
import model

MAX_MB = 20
MAX_BYTES = MAX_MB * 1024 * 1024
MAX_PIXELS = 50_000_000
DISPLAY_SIDE = 640  # photos are shown at most this big; sending a 50 MP photo back is pointless
SIDES = ("a", "b")
TRAIN_COMMAND = "make train"
TRAIN_SCRIPT = "python trainer2.py"


def logs_dir():
    return Path(os.environ.get("LFW_DEMO_LOGS", "logs"))


def data_dir():
    return Path(os.environ.get("LFW_DEMO_DATA", "dataset"))


# ------------------------------------------------------------------ input checks

def check_photo(data, name):
    """Refuse a photo too big to decode safely: bytes first, then the pixel count from the
    header (PIL's open reads only the header), all before the full decode."""
    if len(data) > MAX_BYTES:
        raise faces.FaceError(f"{name}: {len(data) / 2**20:.1f} MB is over the {MAX_MB} MB "
                              "limit; use a smaller photo")
    try:
        with warnings.catch_warnings():
            # PIL warns (or raises, past twice its own limit) on huge images; we decide here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        width = height = MAX_PIXELS  # far over our limit too
    except Exception:  # PIL raises many types on bytes that are not an image
        raise faces.FaceError(f"{name}: not a readable image; upload a JPEG or PNG "
                              "photo") from None
    if width * height > MAX_PIXELS:
        raise faces.FaceError(f"{name}: {width * height / 1e6:.0f} megapixels is over the "
                              f"{MAX_PIXELS // 1_000_000} megapixel limit; use a smaller photo")


def draw_face(image, info):
    """The photo as a PIL image, shrunk for display, with the face box and landmarks."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    scale = min(1.0, DISPLAY_SIDE / max(pil.size))
    if scale < 1.0:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))))
    if info and info.get("box"):
        draw = ImageDraw.Draw(pil)
        line = max(2, round(max(pil.size) / 200))
        draw.rectangle([c * scale for c in info["box"]], outline=(0, 255, 0), width=line)
        for x, y in info.get("landmarks") or []:
            r = line + 1
            draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r],
                         fill=(255, 0, 0))
    return pil


# ------------------------------------------------------------------ cached resources

@st.cache_resource(show_spinner="Loading the face detector…")
def detector():
    return faces.load_detector()


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def load_net(path, mtime):
    """Keyed by path and mtime: a checkpoint rewritten by training is loaded afresh, and
    changing photos or the threshold never reloads it."""
    return model.load_checkpoint(path)


@st.cache_data(max_entries=4, show_spinner=False)
def _list_checkpoints(logs, stamp):
    return model.list_checkpoints(logs)


def checkpoints(logs):
    """model.list_checkpoints, reread only when a best_*.pt appears, goes or changes."""
    stamp = []
    for p in Path(logs).glob("*/best_*.pt"):
        try:
            stamp.append((str(p), p.stat().st_mtime))
        except OSError:  # removed between glob and stat
            continue
    return _list_checkpoints(str(logs), tuple(sorted(stamp))) if stamp else []


@st.cache_data(max_entries=16, show_spinner="Finding the face…")
def analyse(data, name, rule="largest"):
    """Check, decode, detect and align one photo. Returns a dict: `error` (a message for the
    page, or None), `display` (PIL photo with the face drawn, or None), `crop`, `n_faces`.
    Errors are returned, not raised, so that cache_data keeps them too."""
    try:
        check_photo(data, name)
        image = faces.decode_bytes(data, name)
    except faces.FaceError as e:
        return {"error": str(e), "display": None, "crop": None, "n_faces": 0}
    try:
        crop, info = faces.face_from_photo(detector(), image, rule=rule)
    except faces.FaceError as e:
        return {"error": f"{name}: {e}; use a photo where the face is clearly visible and roughly frontal",
                "display": draw_face(image, None), "crop": None, "n_faces": 0}
    return {"error": None, "display": draw_face(image, info), "crop": crop,
            "n_faces": info["n_faces"]}


@st.cache_data(max_entries=64, show_spinner=False)
def pair_score(path, mtime, photo_a, photo_b):
    """Cached so that moving the threshold slider does not rerun the network."""
    net, ckpt = load_net(path, mtime)
    crops = [analyse(p["data"], p["name"], p.get("rule", "largest"))["crop"]
             for p in (photo_a, photo_b)]
    return model.score_faces(net, ckpt["model_config"]["image_size"], *crops,
                             amp=ckpt["config"].get("mixed_precision", False))


# ------------------------------------------------------------------ example pairs

def pairs_file(data):
    for name in ("pairsDevTest.txt", "pairs.txt"):  # DevTest: pairs no model trained on
        if (data / name).is_file():
            return data / name
    return None


@st.cache_data(show_spinner=False)
def read_pairs(path, mtime):
    return dataset.parse_pairs(path)


def pick_example(pairs, image_dir, rng=random):
    """A matched or a mismatched pair (a coin flip) whose two images are on disk, or None."""
    same = rng.random() < 0.5
    pool = [p for p in pairs if bool(p[4]) == same] or pairs
    for _ in range(20):
        name_a, num_a, name_b, num_b, label, _ = rng.choice(pool)
        path_a = dataset.image_path(image_dir, name_a, num_a)
        path_b = dataset.image_path(image_dir, name_b, num_b)
        if path_a.is_file() and path_b.is_file():
            return path_a, path_b, bool(label)
    return None


# ------------------------------------------------------------------ callbacks

def on_upload(side, key):
    upload = st.session_state.get(key)
    st.session_state[f"photo_{side}"] = None if upload is None else \
        {"name": upload.name, "data": upload.getvalue()}
    st.session_state.pop("example", None)  # the pair is no longer LFW's
    st.session_state.pop("example_error", None)


def on_example():
    data = data_dir()
    path = pairs_file(data)
    if path is None:  # removed since the page was drawn
        st.session_state["example_error"] = f"No pairsDevTest.txt or pairs.txt in {data}"
        return
    try:
        picked = pick_example(read_pairs(str(path), path.stat().st_mtime), data / "images")
        if picked:
            # LFW labels the centred face, which is also the one the crops were made from.
            photos = [{"name": p.name, "data": p.read_bytes(), "rule": "center"}
                      for p in picked[:2]]
    except (dataset.ProtocolError, OSError) as e:
        st.session_state["example_error"] = f"Cannot read the LFW example pair: {e}"
        return
    if picked is None:
        st.session_state["example_error"] = f"No example pair has both images under {data / 'images'}"
        return
    for side, photo in zip(SIDES, photos):
        st.session_state[f"photo_{side}"] = photo
    st.session_state["example"] = {"same": picked[2], "file": path.name}
    st.session_state.pop("example_error", None)
    # New widget keys empty the upload boxes, so they don't show files no longer in use.
    st.session_state["uploader_nonce"] = st.session_state.get("uploader_nonce", 0) + 1


# ------------------------------------------------------------------ page parts

def accuracy_text(value):
    return "n/a" if value is None else f"{value:.3f}"


def describe(row):
    return (f"{row['run']} / best_{row['best']} — {row['model']}, {row['loss']}, "
            f"val acc {accuracy_text(row.get('accuracy'))}")


def slider_range(model_config, threshold):
    """Scores of embedding losses with cosine distance are -(1 - cos) in [-2, 0]; the others
    (bce logits, minus L1 distances) are unbounded, so give a span around the threshold."""
    if model_config.get("loss") != "bce" and model_config.get("distance") == "cosine":
        lo, hi = -2.0, 0.0
    else:
        span = max(1.0, 2 * abs(threshold))
        lo, hi = threshold - span, threshold + span
    return min(lo, threshold), max(hi, threshold)


def show_photo(side, photo, image_size):
    """One column: the photo with its face box, the aligned crop, or the error. Returns
    whether a face was found."""
    result = analyse(photo["data"], photo["name"], photo.get("rule", "largest"))
    if result["error"]:
        st.error(result["error"])
    if result["display"] is not None:
        st.image(result["display"], caption=photo["name"])
    if result["crop"] is None:
        return False
    if result["n_faces"] > 1:
        which = "the centred one, as LFW labels it" if photo.get("rule") == "center" else "the largest"
        st.info(f"{result['n_faces']} faces found in photo {side.upper()}; using {which}.")
    seen = dataset.fit(result["crop"], image_size)  # exactly what the network gets
    st.image(seen.permute(1, 2, 0).numpy(), width=150,
             caption=f"Aligned face the model sees ({image_size}×{image_size})")
    return True


def eval_figures(report):
    """The headline numbers of an evaluate.py results.json, formatted for st.metric."""
    figures = {}
    kfold = report.get("kfold")
    if isinstance(kfold, dict) and isinstance(kfold.get("mean"), (int, float)):
        figures["accuracy (10-fold)"] = f"{kfold['mean']:.4f} ± {kfold.get('stderr') or 0:.4f}"
    for key in ("auc", "eer", "tar@far=1e-3"):
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[key] = f"{value:.4f}"
    return figures


def show_run(checkpoint):
    """Training curves from metrics.csv and the newest evaluation's results and ROC."""
    run_dir = Path(checkpoint).parent
    st.header(f"Training run {run_dir.name}")
    left, right = st.columns(2)
    with left:
        try:
            rows = pd.read_csv(run_dir / "metrics.csv").set_index("epoch")
            st.caption("Validation accuracy and AUC by epoch")
            st.line_chart(rows[["accuracy", "auc"]])
            st.caption("Training and validation loss by epoch")
            st.line_chart(rows[["train_loss", "loss"]])
        except FileNotFoundError:
            st.info("No metrics.csv in this run yet.")
        except (ValueError, KeyError, OSError) as e:  # being written, or from another version
            st.warning(f"Cannot read {run_dir / 'metrics.csv'}: {e}")
    with right:
        results = sorted(run_dir.glob("eval-*/results.json"), key=lambda p: p.stat().st_mtime)
        if not results:
            st.info(f"No evaluation of this run yet: `python evaluate.py {checkpoint}` writes "
                    "its results and ROC curve.")
            return
        newest = results[-1]
        try:
            report = json.loads(newest.read_text())
        except (ValueError, OSError) as e:
            st.warning(f"Cannot read {newest}: {e}")
            return
        if not isinstance(report, dict):
            st.warning(f"{newest} is not an evaluate.py report.")
            return
        st.caption(f"Evaluation {newest.parent.name}: {report.get('n_pairs', '?')} pairs of "
                   f"{report.get('pairs', '?')}")
        figures = eval_figures(report)
        for col, (key, value) in zip(st.columns(max(1, len(figures))), figures.items()):
            col.metric(key, value)
        if report.get("contaminated"):
            st.warning("Some people in these pairs were seen in training: the figures are "
                       "optimistic.")
        if (newest.parent / "roc.png").is_file():
            st.image(str(newest.parent / "roc.png"), caption="ROC curve")
        with st.expander("results.json"):
            st.json(report)


def main():
    st.set_page_config(page_title="Same person? LFW face verification", layout="wide")
    st.title("Same person?")
    st.caption("Two photos in; a siamese network trained on LFW scores their faces. "
               "Photos stay on this machine.")

    logs = logs_dir()
    rows = checkpoints(logs)
    if not rows:
        st.error(f"No trained model yet: there is no best_*.pt under `{logs}/`. "
                 f"Train one with `{TRAIN_COMMAND}` (or `{TRAIN_SCRIPT}`), then reload this page.")
        st.stop()

    with st.sidebar:
        # Default: the newest best_accuracy.pt, whose threshold is the accuracy-optimal one.
        newest = model.newest_checkpoint(logs)
        default_index = next((i for i, r in enumerate(rows) if Path(r["path"]) == newest), 0)
        row = st.selectbox(f"Model (checkpoint under {logs}/)", rows, index=default_index,
                           format_func=describe)
    path, mtime = str(row["path"]), row["mtime"]
    try:  # loaded now, so that a broken checkpoint is reported before any photo is given
        _, ckpt = load_net(path, mtime)
        model.require_aligned_faces(ckpt, path)
    except model.CheckpointError as e:
        st.error(f"{e}. Or pick another checkpoint.")
        st.stop()
    image_size = ckpt["model_config"]["image_size"]
    default = float(ckpt["threshold"])
    lo, hi = slider_range(ckpt["model_config"], default)
    with st.sidebar:
        # One key per checkpoint: choosing another model starts at that model's threshold.
        threshold = st.slider("Threshold (score ≥ threshold ⇒ same)", lo, hi, default,
                              step=(hi - lo) / 400, format="%.3f", key=f"threshold:{path}:{mtime}",
                              help="Starts at the threshold chosen on this checkpoint's "
                                   "validation pairs.")
        st.caption(f"Epoch {ckpt.get('epoch')}, validation accuracy "
                   f"{accuracy_text(ckpt['metrics'].get('accuracy'))} at threshold {default:.3f}.")

    data = data_dir()
    if (data / "images").is_dir() and pairs_file(data):
        st.button("Example pair from LFW", on_click=on_example,
                  help="A matched or a mismatched pair at random from the local LFW copy")
    if st.session_state.get("example_error"):
        st.error(st.session_state["example_error"])

    nonce = st.session_state.get("uploader_nonce", 0)
    found = {}
    for side, col in zip(SIDES, st.columns(2)):
        with col:
            key = f"upload_{side}_{nonce}"
            st.file_uploader(f"Photo {side.upper()}", key=key, on_change=on_upload,
                             args=(side, key), max_upload_size=MAX_MB,
                             help=f"JPEG or PNG, up to {MAX_MB} MB and "
                                  f"{MAX_PIXELS // 1_000_000} megapixels")
            photo = st.session_state.get(f"photo_{side}")
            if photo:
                found[side] = show_photo(side, photo, image_size)

    if len(found) < 2:
        st.info("Upload two photos, or try an example pair, to compare their faces.")
    elif all(found.values()):
        score = pair_score(path, mtime, st.session_state["photo_a"], st.session_state["photo_b"])
        same = score >= threshold
        verdict = "Verdict: Same person" if same else "Verdict: Different people"
        (st.success if same else st.warning)(verdict)
        c1, c2, c3 = st.columns(3)
        c1.metric("Score (higher = more alike)", f"{score:.3f}")
        c2.metric("Threshold", f"{threshold:.3f}")
        c3.metric("Score − threshold", f"{score - threshold:+.3f}")
        example = st.session_state.get("example")
        if example:
            truth = "the same person" if example["same"] else "different people"
            agree = "agrees" if example["same"] == same else "disagrees"
            st.caption(f"LFW ({example['file']}) says: {truth}; the model {agree}.")

    show_run(path)


if __name__ == "__main__":  # streamlit runs this file as __main__; tests import it
    main()
