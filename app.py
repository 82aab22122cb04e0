"""Web demo: are the faces in two photos the same person, and who is this? Run:
streamlit run app.py

Two pages, picked in the sidebar: "Same person?" (1:1 verification of two photos) and "Who is
this?" (1:N identification of every face of a photo against a gallery of named people).

Page code only. Decoding, detection and alignment come from faces.py, the network, its crop
settings and its score from model.py, the LFW example pairs from dataset.py and the gallery,
its embedding cache and its search from identify.py: the functions verify.py and identify.py
use, so that the page and the command line agree on the same photos.

LFW_DEMO_LOGS (default logs) is where the checkpoints are looked for, LFW_DEMO_DATA (default
dataset) is the LFW copy the example pairs and the LFW gallery come from, and LFW_DEMO_GALLERY
(optional) is a <person>/<photo> folder offered as a gallery; tests point them elsewhere.
The photos reach the verification page through st.session_state["photo_a"] / ["photo_b"] as
{"name": str, "data": bytes, "rule": optional faces rule}: the upload boxes and the example
button write them there. People enrolled by upload are st.session_state["enrolled"], a list of
{"person": str, "name": str, "data": bytes}.
"""
import hashlib
import io
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import streamlit as st
import torch
from PIL import Image, ImageDraw

import dataset
import faces
import identify
import model

MAX_MB = 20
MAX_BYTES = MAX_MB * 1024 * 1024
DISPLAY_SIDE = 640  # photos are shown at most this big; sending a 50 MP photo back is pointless
SIDES = ("a", "b")
TRAIN_COMMAND = "make train"
TRAIN_SCRIPT = "python trainer2.py"
# A verdict is a close call when |score - threshold| is under this share of the checkpoint's
# score half-span (how far realistic scores lie from its threshold, see score_scale). The
# same-person and different-people scores of a model that is ~90% accurate overlap around
# the threshold, so a pair that near it is often misjudged: for a cosine model at threshold
# -0.4 the band is ±0.09 (the +0.066 "Same person" a user saw is inside it); for a bce model
# it is ±0.45 logits, a 39-61% probability of "same".
CLOSE_SHARE = 0.15
PAGES = ("Same person?", "Who is this?")
TOP = 5          # people shown per face, as identify.py's --top default
THUMB = 110      # match thumbnails' side in pixels: five fit in a row beside the photo
# A folder gallery with more new photos than this is embedded only when asked: LFW's 13,233
# take minutes of CPU the first time, which a visit to the page should not start by itself.
CONFIRM_OVER = 500
MARKDOWN_SPECIALS = set("\\`*_{}[]<>()#+-.!|~$:")
BOX_COLOURS = ((0, 255, 0), (255, 170, 0), (0, 170, 255), (255, 0, 255), (255, 255, 0))


def logs_dir():
    return Path(os.environ.get("LFW_DEMO_LOGS", "logs"))


def data_dir():
    return Path(os.environ.get("LFW_DEMO_DATA", "dataset"))


def gallery_env():
    value = os.environ.get("LFW_DEMO_GALLERY", "").strip()
    return Path(value) if value else None


def percent(value, digits=1):
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


# ------------------------------------------------------------------ photos

def read_photo(data, name):
    """Bytes -> uint8 image tensor or FaceError. The byte size is the page's own limit (an
    upload is held in memory); the pixel limit is faces.decode's, checked from the header."""
    if len(data) > MAX_BYTES:
        raise faces.FaceError(f"{name}: {len(data) / 2**20:.1f} MB is over the {MAX_MB} MB "
                              "limit; use a smaller photo")
    return faces.decode(data, name)


def shrunk(image):
    """(PIL image at most DISPLAY_SIDE on a side, its scale) of a uint8 image tensor."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    scale = min(1.0, DISPLAY_SIDE / max(pil.size))
    if scale < 1.0:
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))))
    return pil, scale


def draw_face(image, info):
    """The photo as a PIL image, shrunk for display, with the face box and landmarks."""
    pil, scale = shrunk(image)
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

@st.cache_resource(max_entries=2, show_spinner="Loading the face detector…")
def detector(settings_json):
    """One MTCNN per crop settings (json.dumps with sorted keys, so equal settings share it)."""
    return faces.detector_for(json.loads(settings_json))


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def load_net(path, mtime):
    """Keyed by path and mtime: a checkpoint rewritten by training is loaded afresh, and
    changing photos or the threshold never reloads it."""
    return model.load_checkpoint(path)


def unloadable_reason(path):
    """Why model.list_checkpoints left a best_*.pt out, in one line naming the file."""
    try:
        _, ckpt = model.load_checkpoint(path)
    except model.CheckpointError as e:
        return str(e)
    missing = [k for k in ("metrics", "threshold") if k not in ckpt]
    if missing:
        return (f"{path}: loads, but has no {' or '.join(missing)}; it was not written by "
                f"training.py, so retrain with `{TRAIN_SCRIPT}`")
    return f"{path}: its metadata cannot be read; retrain with `{TRAIN_SCRIPT}`"


@st.cache_data(max_entries=4, show_spinner=False)
def _list_checkpoints(logs, stamp):
    """(rows of model.list_checkpoints, [(path, reason)] for the files it skipped): it leaves
    unloadable files out silently, and a page that says "no checkpoint" beside a folder of
    best_*.pt files must say why they do not count."""
    rows = model.list_checkpoints(logs)
    listed = {str(r["path"]) for r in rows}
    skipped = [(path, unloadable_reason(path)) for path, _ in stamp if path not in listed]
    return rows, skipped


def checkpoints(logs):
    """_list_checkpoints, reread only when a best_*.pt appears, goes or changes."""
    stamp = []
    for p in Path(logs).glob("*/best_*.pt"):
        try:
            stamp.append((str(p), p.stat().st_mtime))
        except OSError:  # removed between glob and stat
            continue
    return _list_checkpoints(str(logs), tuple(sorted(stamp))) if stamp else ([], [])


@st.cache_data(max_entries=16, show_spinner="Finding the face…")
def analyse(data, name, rule, settings_json):
    """Decode, detect and align one photo as the checkpoint's crop settings say. Returns a
    dict: `error` (a message for the page, or None), `stage` ("read" or "face": what failed),
    `display` (PIL photo with the face drawn, or None), `crop`, `n_faces`, `rule_text`.
    Errors are returned, not raised, so that cache_data keeps them too."""
    failed = {"crop": None, "n_faces": 0, "rule_text": None}
    try:
        image = read_photo(data, name)
    except faces.FaceError as e:
        return {**failed, "error": str(e), "stage": "read", "display": None}
    settings = json.loads(settings_json)
    try:
        crop, info = faces.face_for_model(detector(settings_json), image, settings, rule=rule)
    except faces.FaceError as e:
        return {**failed, "error": f"{name}: {e}; use a photo where the face is clearly "
                                   "visible and roughly frontal",
                "stage": "face", "display": draw_face(image, None)}
    return {"error": None, "stage": None, "display": draw_face(image, info), "crop": crop,
            "n_faces": info["n_faces"], "rule_text": info["rule_text"]}


def photo_rule(photo):
    return photo.get("rule", faces.UPLOAD_RULE)


@st.cache_data(max_entries=64, show_spinner=False)
def pair_score(path, mtime, photo_a, photo_b, settings_json):
    """Cached so that moving the threshold slider does not rerun the network."""
    net, ckpt = load_net(path, mtime)
    crops = [analyse(p["data"], p["name"], photo_rule(p), settings_json)["crop"]
             for p in (photo_a, photo_b)]
    return model.score_faces(net, ckpt["model_config"]["image_size"], *crops,
                             amp=ckpt["config"].get("mixed_precision", False))


# ------------------------------------------------------------------ scores and verdicts

def score_scale(model_config, threshold):
    """(lo, hi, half): the threshold slider's range and how far realistic scores lie from the
    threshold. The validation threshold sits between the same and different scores, so the
    scores spread about as far from it as it is from the best score. Cosine scores are
    cos - 1 in [-2, 0]: different people near -1, the same near 0, so half is the larger of
    |t| and 1 - |t|. Minus an L1 distance is <= 0 and scales with the embedding: half = |t|.
    bce logits are unbounded around 0: at least ±3 (5% to 95% "same")."""
    t = threshold
    if model_config.get("loss") == "bce":
        half = max(3.0, 2 * abs(t))
        lo, hi = t - half, t + half
    elif model_config.get("distance") == "cosine":
        half = max(abs(t), 1 - abs(t), 0.1)
        lo, hi = max(-2.0, t - half), min(0.0, t + half)
    else:
        half = max(abs(t), 1e-3)
        lo, hi = t - half, min(0.0, t + half)
    return min(lo, t), max(hi, t), half


def score_meaning(model_config):
    """One line: what the score is and which way is "same"."""
    if model_config.get("loss") == "bce":
        what = "the network's logit that the two faces are one person"
    elif model_config.get("distance") == "cosine":
        what = ("the cosine similarity of the two face embeddings minus 1 (0: identical, "
                "−2: opposite)")
    else:
        what = "minus the L1 distance between the two face embeddings (0: identical)"
    return f"Score = {what}. Higher means more alike: score ≥ threshold ⇒ same person."


def verdict(score, threshold, half):
    """(text, same, close): the decision and whether it is a close call (see CLOSE_SHARE)."""
    margin = score - threshold
    same, close = margin >= 0, abs(margin) < CLOSE_SHARE * half
    text = "Verdict: " + ("Same person" if same else "Different people")
    return text + (" (close call)" if close else ""), same, close


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


# ------------------------------------------------------------------ sidebar: the model

def no_model_message(logs, skipped):
    """Why there is nothing to score with: no file at all, or files that do not load."""
    if not skipped:
        return (f"No trained model yet: there is no best_*.pt under `{logs}/`. Train one with "
                f"`{TRAIN_COMMAND}` (or `{TRAIN_SCRIPT}`), then reload this page.")
    lines = "\n".join(f"- {reason}" for _, reason in skipped)
    return (f"No usable model: {len(skipped)} best_*.pt file(s) under `{logs}/` cannot be "
            f"loaded:\n\n{lines}\n\nTrain a new one with `{TRAIN_COMMAND}` (or "
            f"`{TRAIN_SCRIPT}`), then reload this page.")


def pick_checkpoint(rows, logs):
    """Two short pickers (run, then which best_*.pt), so that no label is cut off. Defaults
    to the newest best_accuracy.pt (whose threshold is the accuracy-optimal one), or if that
    one does not load, the newest that does."""
    runs = list(dict.fromkeys(r["run"] for r in rows))  # newest run first, as rows are
    newest = model.newest_checkpoint(logs)
    newest = next((r for r in rows if Path(r["path"]) == newest), None) or \
        next((r for r in rows if r["best"] == "accuracy"), rows[0])
    run = st.selectbox("Training run", runs, index=runs.index(newest["run"]),
                       help=f"The runs under {logs}/, newest first")
    in_run = [r for r in rows if r["run"] == run]
    default = next((i for i, r in enumerate(in_run) if r["best"] == "accuracy"), 0)
    row = st.selectbox("Checkpoint: best validation…", in_run, index=default, key=f"best:{run}",
                       format_func=lambda r: f"{r['best']} (val acc {percent(r.get('accuracy'))})")
    st.caption(f"{row['model']} / {row['loss']} / {row['distance']}, {row['image_size']} px, "
               f"epoch {row['epoch']}: {run}/{Path(row['path']).name}")
    return row


def sidebar(rows, skipped, logs):
    """The model, its crop settings and the threshold, or a stopped page saying why not.
    Returns (path, mtime, ckpt, settings_json, threshold, half)."""
    with st.sidebar:
        row = pick_checkpoint(rows, logs)
        if skipped:
            with st.expander(f"{len(skipped)} checkpoint(s) cannot be loaded"):
                for _, reason in skipped:
                    st.caption(reason)
    path, mtime = str(row["path"]), row["mtime"]
    try:  # loaded now, so that a broken checkpoint is reported before any photo is given
        _, ckpt = load_net(path, mtime)
        settings = model.checkpoint_crop_settings(ckpt, path)
    except model.CheckpointError as e:
        st.error(f"{e}. Or pick another checkpoint.")
        st.stop()
    default = float(ckpt["threshold"])
    lo, hi, half = score_scale(ckpt["model_config"], default)
    with st.sidebar:
        # One key per checkpoint: choosing another model starts at that model's threshold.
        threshold = st.slider("Threshold (score ≥ threshold ⇒ same)", lo, hi, default,
                              step=(hi - lo) / 400, format="%.3f", key=f"threshold:{path}:{mtime}",
                              help="Starts at the threshold chosen on this checkpoint's "
                                   "validation pairs; the range spans the scores it gives.")
        st.caption(f"Validation accuracy {percent(ckpt['metrics'].get('accuracy'))} at "
                   f"threshold {default:.3f}.")
    return path, mtime, ckpt, json.dumps(settings, sort_keys=True), threshold, half


# ------------------------------------------------------------------ main area: photos, verdict

def show_photo(side, photo, image_size, settings_json):
    """One column: the photo (full file name) with its face box, the aligned crop, or the
    error. Returns analyse()'s result."""
    result = analyse(photo["data"], photo["name"], photo_rule(photo), settings_json)
    st.text(f"Photo {side.upper()}: {photo['name']}")  # plain text: the full name, unescaped
    if result["error"]:
        st.error(result["error"])
    if result["display"] is not None:
        st.image(result["display"])
    if result["crop"] is None:
        return result
    if result["n_faces"] > 1:
        st.info(f"{result['n_faces']} faces found in photo {side.upper()}; using "
                f"{result['rule_text']}.")
    seen = dataset.fit(result["crop"], image_size)  # exactly what the network gets
    st.image(seen.permute(1, 2, 0).numpy(), width=150,
             caption=f"Aligned face the model sees ({image_size}×{image_size})")
    return result


def show_no_verdict(results):
    """Why there is no verdict: photos missing, unreadable or without a face."""
    if len(results) < 2:
        given = "".join(f" Photo {s.upper()} is in." for s in results)
        st.info("Upload two photos, or press “Example pair from LFW”, to compare their "
                f"faces.{given}")
        return
    why = {"read": "could not be read", "face": "has no face the detector could find"}
    problems = [f"photo {s.upper()} ({st.session_state[f'photo_{s}']['name']}) {why[r['stage']]}"
                for s, r in results.items() if r["error"]]
    st.error(f"No verdict: {' and '.join(problems)}. The model compares two faces, so it needs "
             "one clearly visible face in each photo; see the message under the photo.")


def show_verdict(score, threshold, half, model_config):
    """The verdict first, then the figures behind it and what the score means."""
    text, same, close = verdict(score, threshold, half)
    style = st.warning if close else st.success if same else st.info
    style(text)
    c1, c2, c3 = st.columns(3)
    c1.metric("Score", f"{score:.3f}")
    c2.metric("Threshold", f"{threshold:.3f}")
    c3.metric("Margin (score − threshold)", f"{score - threshold:+.3f}")
    st.caption(f"{score_meaning(model_config)} Within ±{CLOSE_SHARE * half:.3f} of the "
               "threshold the verdict is a close call: pairs that near it are where the "
               "model errs most.")
    example = st.session_state.get("example")
    if example:
        truth = "the same person" if example["same"] else "different people"
        agree = "agrees" if example["same"] == same else "disagrees"
        st.caption(f"LFW ({example['file']}) says: {truth}; the model {agree}.")


def photo_inputs(image_size, settings_json):
    """Example button, the two upload boxes and each photo under its box; {side: result}."""
    data = data_dir()
    if (data / "images").is_dir() and pairs_file(data):
        st.button("Example pair from LFW", on_click=on_example,
                  help="A matched or a mismatched pair at random from the local LFW copy")
    if st.session_state.get("example_error"):
        st.error(st.session_state["example_error"])
    nonce = st.session_state.get("uploader_nonce", 0)
    results = {}
    for side, col in zip(SIDES, st.columns(2)):
        with col:
            key = f"upload_{side}_{nonce}"
            st.file_uploader(f"Photo {side.upper()}", key=key, on_change=on_upload,
                             args=(side, key), max_upload_size=MAX_MB,
                             help=f"JPEG or PNG, up to {MAX_MB} MB and "
                                  f"{faces.MAX_PIXELS // 1_000_000} megapixels")
            photo = st.session_state.get(f"photo_{side}")
            if photo:
                results[side] = show_photo(side, photo, image_size, settings_json)
    return results


# ------------------------------------------------------------------ the run: curves, evaluations

def show_curves(run_dir):
    """Validation accuracy/AUC, training loss and validation loss: three charts, as the two
    losses are different quantities on different scales (training 25 -> 1.3, validation 0.17)."""
    try:
        rows = pd.read_csv(run_dir / "metrics.csv").set_index("epoch")
        charts = (("Validation accuracy and AUC", ["accuracy", "auc"]),
                  ("Training loss", ["train_loss"]), ("Validation loss", ["loss"]))
        for col, (title, keys) in zip(st.columns(3), charts):
            col.caption(f"{title} by epoch")
            col.line_chart(rows[keys].rename(columns={"train_loss": "training loss",
                                                      "loss": "validation loss"}))
    except FileNotFoundError:
        st.info("No metrics.csv in this run yet.")
    except (ValueError, KeyError, OSError) as e:  # being written, or from another version
        st.warning(f"Cannot read {run_dir / 'metrics.csv'}: {e}")


def read_evaluations(run_dir, checkpoint):
    """[(folder, report)] of the run's evaluate.py results, the honest ones first: not
    contaminated (no test person seen in training), then unchecked, then contaminated; then
    those of this checkpoint file; then newest. Unreadable ones are warned about."""
    found = []
    for path in run_dir.glob("eval-*/results.json"):
        try:
            report, mtime = json.loads(path.read_text()), path.stat().st_mtime
        except (ValueError, OSError) as e:
            st.warning(f"Cannot read {path}: {e}")
            continue
        if isinstance(report, dict):
            found.append((path.parent, report, mtime))
    rank = {False: 0, None: 1}
    found.sort(key=lambda f: (rank.get(f[1].get("contaminated"), 2),
                              Path(str(f[1].get("checkpoint", ""))).name != Path(checkpoint).name,
                              -f[2]))
    return [(folder, report) for folder, report, _ in found]


def eval_figures(report):
    """The headline numbers of an evaluate.py results.json, short enough for st.metric."""
    figures = {}
    kfold = report.get("kfold")
    if isinstance(kfold, dict) and isinstance(kfold.get("mean"), (int, float)):
        figures["Accuracy (10-fold)"] = (f"{percent(kfold['mean'])} ± "
                                         f"{percent(kfold.get('stderr') or 0)}")
    for key, label, fmt in (("auc", "AUC", "{:.3f}"), ("eer", "EER", None),
                            ("tar@far=1e-3", "TAR @ FAR 0.1%", None)):
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[label] = fmt.format(value) if fmt else percent(value)
    return figures


def eval_label(folder, report):
    """Which evaluation this is, and whether its figure can be trusted."""
    what = (f"{folder.name}: {report.get('n_pairs', '?')} pairs of "
            f"{Path(str(report.get('pairs', '?'))).name}")
    if report.get("checkpoint"):
        what += f", {Path(str(report['checkpoint'])).name}"
    if report.get("contaminated"):
        return (f"{what}. Contaminated: {report.get('people_seen_in_training', 'some')} of "
                f"{report.get('people_in_pairs', '?')} people in these pairs were seen in "
                "training, so its figures are optimistic.")
    if report.get("contaminated") is None:
        return f"{what}. Not checked for people seen in training."
    return f"{what}. No test person was seen in training."


def show_evaluations(run_dir, checkpoint):
    """The honest evaluation's figures and ROC; any others on one labelled line each."""
    evaluations = read_evaluations(run_dir, checkpoint)
    if not evaluations:
        st.info(f"No evaluation of this run yet: `python evaluate.py {checkpoint}` writes "
                "its results and ROC curve.")
        return
    folder, report = evaluations[0]
    (st.warning if report.get("contaminated") else st.caption)(eval_label(folder, report))
    figures = eval_figures(report)
    for col, (key, value) in zip(st.columns(max(1, len(figures))), figures.items()):
        col.metric(key, value)
    for other, other_report in evaluations[1:]:
        accuracy = eval_figures(other_report).get("Accuracy (10-fold)", "n/a")
        (st.warning if other_report.get("contaminated") else st.caption)(
            f"Also: accuracy {accuracy} on {eval_label(other, other_report)}")
    left, right = st.columns(2)
    if (folder / "roc.png").is_file():
        left.image(str(folder / "roc.png"), caption=f"ROC curve ({folder.name})")
    with right.expander(f"{folder.name}/results.json"):
        st.json(report)


def show_run(checkpoint):
    """The run's training curves, then its evaluations."""
    run_dir = Path(checkpoint).parent
    st.header(f"Training run {run_dir.name}")
    show_curves(run_dir)
    st.subheader("Evaluation on LFW test pairs")
    show_evaluations(run_dir, checkpoint)


# ------------------------------------------------------------------ "Who is this?": the gallery

@st.cache_data(max_entries=4, show_spinner=False)
def checkpoint_sha(path, mtime):
    """The checkpoint's content hash: identify.py keys its gallery cache by it."""
    return identify.sha256_file(path)


def checkpoint_tools(path, mtime, settings_json):
    """identify.py's tools for the sidebar's checkpoint: the verification page's own cached
    net and detector and its crop settings, so that both pages see a face alike."""
    net, ckpt = load_net(path, mtime)
    return SimpleNamespace(
        net=net, settings=json.loads(settings_json), detector=detector(settings_json),
        device=next(net.parameters()).device, image_size=ckpt["model_config"]["image_size"],
        amp=ckpt.get("config", {}).get("mixed_precision", False),
        ckpt_sha=checkpoint_sha(path, mtime))


def gallery_sources():
    """{label: folder or None} of the galleries on offer, the first the default: the
    LFW_DEMO_GALLERY folder (set on purpose, so it leads), LFW's people when the copy is
    there, and people enrolled on this page (None), always."""
    sources = {}
    if gallery_env():
        sources[f"Folder {gallery_env()}"] = gallery_env()
    if (data_dir() / "images").is_dir():
        sources[f"LFW people ({data_dir() / 'images'})"] = data_dir() / "images"
    sources["People I enrol here"] = None
    return sources


@st.cache_resource
def gallery_store():
    """Loaded folder galleries, {key: gallery}, the last two, shared by every session: a
    rerun (a slider moved, a photo given) must not hash a 13,233-photo folder again."""
    return {}


def files_key(folder, files, ckpt_sha):
    """What a loaded folder gallery depends on: the checkpoint and every file's path, size and
    modification time (a changed photo changes its content hash too, in identify's cache)."""
    digest = hashlib.sha256()
    for _, p in files:
        try:
            stat = p.stat()
            digest.update(f"{p}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:  # gone since the listing: load_gallery warns about it
            digest.update(f"{p}\0gone\n".encode())
    return f"{Path(folder).resolve()}:{ckpt_sha}:{digest.hexdigest()}"


def folder_gallery(folder, tools):
    """identify.py's gallery of a <person>/<photo> folder, its cache beside it brought up to
    date (with a progress bar, and after a button press when there are many new photos).
    Returns (gallery, key), the gallery None while it waits for the button; IdentifyError
    if the folder is unusable."""
    files = identify.gallery_files(folder)
    key, store = files_key(folder, files, tools.ckpt_sha), gallery_store()
    if key in store:  # loaded before: nothing is embedded now
        return SimpleNamespace(**{**vars(store[key]), "n_new": 0}), key
    with st.spinner(f"Reading the {len(files):,} photos of {folder}…"):
        state = identify.gallery_state(folder, files, tools)
    todo = state[4]
    if len(todo) > CONFIRM_OVER and not st.session_state.get(f"embed:{key}"):
        st.info(f"{len(todo):,} of the gallery's {len(files):,} photos are not embedded yet "
                "for this checkpoint. That takes minutes on a CPU, once: the embeddings are "
                f"then cached beside the photos ({identify.cache_path(folder, tools.ckpt_sha).name}).")
        if st.button(f"Embed {len(todo):,} photos"):
            st.session_state[f"embed:{key}"] = True
            st.rerun()
        return None, key
    bar = st.progress(0.0, text=f"Embedding the gallery: 0 of {len(todo):,} new photos…") \
        if todo else None

    def progress(done, total):  # a first LFW gallery takes minutes: show where it is
        bar.progress(done / total, text=f"Embedding the gallery: {done:,} of {total:,} new "
                                        "photos…")
    gallery = identify.load_gallery(folder, files, tools, state=state,
                                    progress=progress if todo else None)
    if bar is not None:
        bar.empty()
    while len(store) >= 2:
        store.pop(next(iter(store)))
    store[key] = gallery
    return gallery, key


@st.cache_data(max_entries=256, show_spinner="Embedding the gallery photo…")
def enrolled_embedding(data, name, path, mtime, settings_json):
    """(embedding (1, d), None) of an enrolled photo's face, or (None, why not): analyse()'s
    face, embedded by identify.py as a folder gallery's photos are. Cached per checkpoint, so
    a rerun embeds nothing; errors are returned, not raised, so that the cache keeps them."""
    result = analyse(data, name, faces.UPLOAD_RULE, settings_json)
    if result["error"]:
        return None, result["error"]
    tools = checkpoint_tools(path, mtime, settings_json)
    return identify.embed_faces(tools.net, [result["crop"]], tools.image_size, tools.device,
                                tools.amp), None


def enrolled_gallery(enrolled, path, mtime, settings_json):
    """The enrolled people as an identify.py gallery (the fields answer_faces reads); each
    photo is "enrolled:<index>" in it. IdentifyError when no photo has a face."""
    people, person_of, rows, photos, warnings = [], [], [], [], []
    for i, entry in enumerate(enrolled):
        emb, error = enrolled_embedding(entry["data"], entry["name"], path, mtime, settings_json)
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
    person_of = torch.tensor(person_of)
    net, _ = load_net(path, mtime)
    return SimpleNamespace(
        folder=None, people=people, photos=photos, person_of=person_of,
        members=[torch.nonzero(person_of == i).flatten() for i in range(len(people))],
        matrix=identify.prepare_gallery(net, torch.cat(rows)), warnings=warnings, n_new=0,
        n_files=len(enrolled))


def on_enrol(key, settings_json):
    """Add the chosen photo under the typed name, once its face is found; else say why."""
    upload, person = st.session_state.get(key), st.session_state.get("enrol_name", "").strip()
    error = None
    if upload is None:
        error = "Choose a photo of the person first, then press “Add to gallery”."
    elif not person:
        error = f"Type the name of the person in {upload.name} first."
    else:
        data = upload.getvalue()
        error = analyse(data, upload.name, faces.UPLOAD_RULE, settings_json)["error"]
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


def enrol_form(settings_json):
    """Name, photo and "Add to gallery"; then who is enrolled, with a button to start over."""
    nonce = st.session_state.get("enrol_nonce", 0)
    left, right = st.columns([1, 2])
    left.text_input("Name", key="enrol_name", placeholder="e.g. Eileen Collins")
    key = f"enrol_photo_{nonce}"
    right.file_uploader("Their photo", key=key, max_upload_size=MAX_MB,
                        help=f"JPEG or PNG, up to {MAX_MB} MB; its most prominent face is used")
    st.button("Add to gallery", key="enrol", on_click=on_enrol, args=(key, settings_json))
    if st.session_state.get("enrol_error"):
        st.error(st.session_state["enrol_error"])
    enrolled = st.session_state.get("enrolled", [])
    if enrolled:
        counts = {}
        for entry in enrolled:
            counts[entry["person"]] = counts.get(entry["person"], 0) + 1
        st.caption("Enrolled: " + ", ".join(f"{display_name(p)} ({n} photo{'s' if n > 1 else ''})"
                                            for p, n in counts.items()))
        st.button("Remove everyone", key="clear_enrolled", on_click=on_clear_enrolled)
    return enrolled


def pick_gallery(path, mtime, settings_json, tools):
    """The gallery chooser and the chosen gallery: (gallery, key) or (None, None) with the
    reason on the page in one line."""
    sources = gallery_sources()
    label = st.radio("Gallery: the people to search", list(sources), key="gallery_source",
                     horizontal=True)
    folder = sources[label]
    try:
        if folder is None:
            enrolled = enrol_form(settings_json)
            if not enrolled:
                st.info("Enrol at least one person: type their name, choose their photo and "
                        "press “Add to gallery”. Add more photos under the same name to "
                        "enrol them more than once.")
                return None, None
            gallery = enrolled_gallery(enrolled, path, mtime, settings_json)
            key = (tools.ckpt_sha, tuple((e["person"], hashlib.sha256(e["data"]).hexdigest())
                                         for e in enrolled))
        else:
            gallery, key = folder_gallery(folder, tools)
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


# ------------------------------------------------------------------ "Who is this?": the answers

def draw_faces(image, boxes):
    """The photo, shrunk for display, with every face boxed and numbered as listed."""
    pil, scale = shrunk(image)
    draw = ImageDraw.Draw(pil)
    line = max(2, round(max(pil.size) / 200))
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        x0, y0, x1, y1 = (c * scale for c in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line)
        draw.text((x0 + line + 2, max(0, y0 - 12 - line)), str(i + 1), fill=colour)
    return pil


@st.cache_data(max_entries=16, show_spinner="Finding and identifying the faces…")
def identify_photo(data, name, gallery_key, _gallery, _tools):
    """Every face of the photo against the gallery, as identify.py answers a query: {error,
    display, faces: [{box, score, top: [{person, score, photo}]}]}. Keyed by the photo and
    gallery_key (what the gallery is made of); the threshold is applied by the caller, so
    moving the slider reruns no network."""
    try:
        image = read_photo(data, name)
    except faces.FaceError as e:
        return {"error": str(e), "display": None, "faces": []}
    answer = identify.answer_queries([(name, image)], _tools, _gallery, TOP, float("inf"))[0]
    boxes = [f["box"] for f in answer["faces"]]
    error = None if boxes else (f"{name}: no face found; use a photo where the face is clearly "
                                "visible and roughly frontal")
    return {"error": error, "display": draw_faces(image, boxes), "faces": answer["faces"]}


@st.cache_data(max_entries=512, show_spinner=False)
def thumbnail(data):
    """A small copy of a gallery photo, or None if it no longer decodes."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (2 * THUMB, 2 * THUMB))  # a JPEG decodes at a fraction of its size
            pil = im.convert("RGB")
        pil.thumbnail((THUMB, THUMB))
        return pil
    except Exception:  # PIL raises many types; a missing thumbnail is not worth a message
        return None


def photo_bytes(photo):
    """The bytes of a gallery photo as answer_faces names it: a path, or "enrolled:<i>"."""
    if photo.startswith("enrolled:"):
        enrolled = st.session_state.get("enrolled", [])
        i = int(photo.split(":", 1)[1])
        return enrolled[i]["data"] if i < len(enrolled) else None
    try:
        return Path(photo).read_bytes()
    except OSError:
        return None


def display_name(person):
    """A gallery name as Markdown shows it: LFW's folder names join words with underscores
    (George_W_Bush), and a typed name's * or [ must not turn into formatting."""
    text = person.replace("_", " ")
    return "".join(f"\\{c}" if c in MARKDOWN_SPECIALS else c for c in text)


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


def identify_page(path, mtime, ckpt, settings_json, threshold):
    """Gallery, query photo, then each face's answer beside the photo with its faces boxed."""
    tools = checkpoint_tools(path, mtime, settings_json)
    gallery, gallery_key = pick_gallery(path, mtime, settings_json, tools)
    st.divider()
    nonce = st.session_state.get("query_nonce", 0)
    query = st.file_uploader("Photo to identify", key=f"query_{nonce}", max_upload_size=MAX_MB,
                             disabled=gallery is None,
                             help=f"JPEG or PNG, up to {MAX_MB} MB and "
                                  f"{faces.MAX_PIXELS // 1_000_000} megapixels; every face in "
                                  "it is identified")
    if gallery is None or query is None:
        return
    result = identify_photo(query.getvalue(), query.name, gallery_key, gallery, tools)
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
            show_face_answer(number, face, threshold)
    st.caption(f"{score_meaning(ckpt['model_config'])} A person's score is that of their "
               "best-matching gallery photo; below the threshold the face is “unknown”.")


def main():
    page = st.session_state.get("page", PAGES[0])  # the sidebar's choice, before it is drawn
    identifying = page == PAGES[1]
    st.set_page_config(page_title="Who is this? LFW face identification" if identifying else
                       "Same person? LFW face verification", layout="wide")
    st.title(page)
    st.caption(("Every face of a photo, searched among the people of a gallery; a siamese "
                "network trained on LFW scores them." if identifying else
                "Two photos in; a siamese network trained on LFW scores their faces.")
               + " Photos stay on this machine.")
    st.sidebar.radio("Page", PAGES, key="page", horizontal=True)

    logs = logs_dir()
    rows, skipped = checkpoints(logs)
    if not rows and not skipped and model.SHIPPED.is_file():  # no run of one's own yet
        rows = [model.checkpoint_row(model.SHIPPED, run="shipped model")]
        st.info(model.describe_checkpoint(model.SHIPPED, logs).replace("model: ", "Model: ", 1))
    if not rows:
        st.error(no_model_message(logs, skipped))
        st.stop()
    path, mtime, ckpt, settings_json, threshold, half = sidebar(rows, skipped, logs)
    if identifying:
        identify_page(path, mtime, ckpt, settings_json, threshold)
        return

    verdict_box = st.container()  # filled last, but drawn first: where the eye lands
    results = photo_inputs(ckpt["model_config"]["image_size"], settings_json)
    with verdict_box:
        if len(results) < 2 or any(r["error"] for r in results.values()):
            show_no_verdict(results)
        else:
            score = pair_score(path, mtime, st.session_state["photo_a"],
                               st.session_state["photo_b"], settings_json)
            show_verdict(score, threshold, half, ckpt["model_config"])

    show_run(path)


if __name__ == "__main__":  # streamlit runs this file as __main__; tests import it
    main()
