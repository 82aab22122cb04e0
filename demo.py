"""What the demo's pages share: where it looks, photos, the chosen model and its scores.

app.py draws the frame (title, the sidebar model chooser of this module, navigation); the
pages in demo_pages/ draw the rest. The model is an inference.FaceModel, loaded once per
checkpoint file version (face_model), so that the pages and verify.py / identify.py crop,
embed and score a photo alike. The sidebar's choice reaches the pages through
st.session_state["model"] (see Choice): like all session state it is per browser session.

LFW_DEMO_LOGS (default logs) is where the checkpoints are looked for, LFW_DEMO_DATA (default
dataset) is the LFW copy the example pairs and the LFW gallery come from, and LFW_DEMO_GALLERY
(optional) is a <person>/<photo> folder offered as a gallery; tests point them elsewhere.
"""
import json
import os
import stat
from pathlib import Path
from typing import NamedTuple, Optional

import streamlit as st
from PIL import Image, ImageDraw

import faces
import losses
import model
import operating_points as op
from inference import FaceModel

MAX_MB = 20
MAX_BYTES = MAX_MB * 1024 * 1024
DISPLAY_SIDE = 640  # photos are shown at most this big; sending a 50 MP photo back is pointless
TRAIN_COMMAND = "make train"
TRAIN_SCRIPT = "python trainer2.py"
MARKDOWN_SPECIALS = set("\\`*_{}[]<>()#+-.!|~$:")


def logs_dir():
    return Path(os.environ.get("LFW_DEMO_LOGS", "logs"))


def data_dir():
    return Path(os.environ.get("LFW_DEMO_DATA", "dataset"))


def gallery_env():
    value = os.environ.get("LFW_DEMO_GALLERY", "").strip()
    return Path(value) if value else None


def regular_file(path):
    """Whether path is a plain file. Opening a FIFO named best_*.pt or metrics.csv waits for
    a writer forever (the page never loads), so nothing else is ever opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def not_regular(path):
    return f"{path}: not a regular file (a pipe, device or folder), so it is not opened"


def percent(value, digits=1):
    return "n/a" if value is None else f"{100 * value:.{digits}f}%"


def display_name(person):
    """A name as Markdown shows it: LFW's folder names join words with underscores
    (George_W_Bush), and a typed name's * or [ must not turn into formatting."""
    text = person.replace("_", " ")
    return "".join(f"\\{c}" if c in MARKDOWN_SPECIALS else c for c in text)


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


@st.cache_data(max_entries=16, show_spinner="Finding the face…")
def analyse(data, name, rule, settings_json, _fm):
    """One photo decoded, and its face found and aligned by the model (_fm.face). Keyed by
    the crop settings, not the model: checkpoints that crop alike share the work. Returns a
    dict: `error` (a message for the page, or None), `stage` ("read" or "face": what failed),
    `display` (PIL photo with the face drawn, or None), `crop`, `n_faces`, `rule_text`.
    Errors are returned, not raised, so that cache_data keeps them too."""
    failed = {"crop": None, "n_faces": 0, "rule_text": None}
    try:
        image = read_photo(data, name)
    except faces.FaceError as e:
        return {**failed, "error": str(e), "stage": "read", "display": None}
    try:
        crop, info = _fm.face(image, rule=rule)
    except faces.FaceError as e:
        return {**failed, "error": f"{name}: {e}; use a photo where the face is clearly "
                                   "visible and roughly frontal",
                "stage": "face", "display": draw_face(image, None)}
    return {"error": None, "stage": None, "display": draw_face(image, info), "crop": crop,
            "n_faces": info["n_faces"], "rule_text": info["rule_text"]}


# ------------------------------------------------------------------ the model and its scores

@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def face_model(path, mtime):
    """Keyed by path and mtime: a checkpoint rewritten by training is loaded afresh, and
    changing photos or the threshold never reloads it."""
    return FaceModel.load(path)


def crop_key(fm):
    """The model's crop settings as a cache key: equal settings give equal faces."""
    return json.dumps(fm.settings, sort_keys=True)


def learned_head(model_config):
    """Whether the checkpoint's loss scores pairs with a head it trained (a logit), as
    losses.py declares it, rather than with the embeddings' distance."""
    entry = losses.LOSSES.get(model_config.get("loss"))
    return bool(entry and entry.learned_head)


def score_scale(model_config, threshold):
    """(lo, hi, half): the threshold slider's range and how far realistic scores lie from the
    threshold. The validation threshold sits between the same and different scores, so the
    scores spread about as far from it as it is from the best score. Cosine scores are
    cos - 1 in [-2, 0]: different people near -1, the same near 0, so half is the larger of
    |t| and 1 - |t|. Minus an L1 distance is <= 0 and scales with the embedding: half = |t|.
    A learned head's logits are unbounded around 0: at least ±3 (5% to 95% "same")."""
    t = threshold
    if learned_head(model_config):
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
    if learned_head(model_config):
        what = "the network's logit that the two faces are one person"
    elif model_config.get("distance") == "cosine":
        what = ("the cosine similarity of the two face embeddings minus 1 (0: identical, "
                "−2: opposite)")
    else:
        what = "minus the L1 distance between the two face embeddings (0: identical)"
    return f"Score = {what}. Higher means more alike: score ≥ threshold ⇒ same person."


# ------------------------------------------------------------------ the sidebar's checkpoints

def unloadable_reason(path):
    """Why model.checkpoint_row cannot read a best_*.pt, in one line naming the file."""
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
def _list_checkpoints(stamp):
    """(model.checkpoint_row of each stamped file, newest first, [(path, reason)] for those
    that do not load): a page that says "no checkpoint" beside a folder of best_*.pt files
    must say why they do not count. Only the stamp's plain files are opened, never a glob
    (model.list_checkpoints opens whatever the name matches)."""
    rows, skipped = [], []
    for path, _ in stamp:
        try:
            rows.append(model.checkpoint_row(path))
        except Exception:  # torch.load fails in many ways on a half-written or foreign file
            skipped.append((path, unloadable_reason(path)))
    return sorted(rows, key=lambda r: r["mtime"], reverse=True), skipped


def checkpoints(logs):
    """_list_checkpoints of the plain best_*.pt files, reread only when one appears, goes or
    changes; any other kind of file (a FIFO, a folder) is listed as skipped, unopened."""
    stamp, odd = [], []
    for p in Path(logs).glob("*/best_*.pt"):
        try:
            info = p.stat()
        except OSError:  # removed between glob and stat
            continue
        if stat.S_ISREG(info.st_mode):
            stamp.append((str(p), info.st_mtime))
        else:
            odd.append((str(p), f"{not_regular(p)}; remove it or put a checkpoint there"))
    rows, skipped = _list_checkpoints(tuple(sorted(stamp))) if stamp else ([], [])
    return rows, skipped + odd


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
    return st.selectbox("Checkpoint: best validation…", in_run, index=default, key=f"best:{run}",
                        format_func=lambda r: f"{r['best']} (val acc {percent(r.get('accuracy'))})")


# ------------------------------------------------------------------ the sidebar's choice

ACCURACY_LEVEL = "best accuracy"


def strictness_levels(fm):
    """{label: (threshold, what it means)} of the strictness choice: the accuracy-optimal
    threshold, then 1 in 100, 1 in 1,000 and 1 in 10,000 different-person pairs accepted, as
    the checkpoint measured them on its validation people (none in an older checkpoint)."""
    t, _, meaning = fm.decision()
    levels = {ACCURACY_LEVEL: (t, capital(meaning) or f"Validation accuracy "
                               f"{percent(fm.ckpt['metrics'].get('accuracy'))} at threshold "
                               f"{t:.3f}.")}
    ops = fm.ckpt.get("operating_points") or {}
    for point in (ops.get("points") or {}).values():
        levels[f"{op.one_in(point['far'])} strangers pass"] = (
            point["threshold"], capital(op.sentence(point, ops)))
    return levels


def capital(text):
    return text and text[0].upper() + text[1:]


class Choice(NamedTuple):
    """What the sidebar chose, for the pages: the checkpoint file version (face_model's
    key), the threshold set on the slider, the score half-span (score_scale), and a line on
    which model this is when it is not one of the user's runs."""
    path: str
    mtime: float
    threshold: float
    half: float
    notice: Optional[str] = None

    @property
    def model(self):
        return face_model(self.path, self.mtime)


def sidebar():
    """The model and the threshold, chosen in the sidebar: a Choice, or a stopped page saying
    why there is none. Drawn by app.py before the page, so that both pages share it."""
    logs, notice = logs_dir(), None
    rows, skipped = checkpoints(logs)
    if not rows and not skipped and model.SHIPPED.is_file():  # no run of one's own yet
        rows = [model.checkpoint_row(model.SHIPPED, run="shipped model")]
        notice = model.describe_checkpoint(model.SHIPPED, logs).replace("model: ", "Model: ", 1)
    if not rows:
        st.error(no_model_message(logs, skipped))
        st.stop()
    with st.sidebar:
        row = pick_checkpoint(rows, logs)
    path, mtime = str(row["path"]), row["mtime"]
    try:  # loaded now, so that a broken checkpoint is reported before any photo is given
        fm = face_model(path, mtime)
        _ = fm.settings  # CheckpointError when it has none
    except model.CheckpointError as e:
        st.error(f"{e}. Or pick another checkpoint.")
        st.stop()
    levels = strictness_levels(fm)
    lo, hi, half = score_scale(fm.ckpt["model_config"], fm.threshold)
    lo, hi = min([lo] + [t for t, _ in levels.values()]), max([hi] + [t for t, _ in levels.values()])
    with st.sidebar:
        st.caption(f"{row['model']} / {row['loss']} / {row['distance']}, {fm.image_size} px, "
                   f"epoch {row['epoch']}: {row['run']}/{Path(path).name}")
        if skipped:
            with st.expander(f"{len(skipped)} checkpoint(s) cannot be loaded"):
                for _, reason in skipped:
                    st.caption(reason)
        level = st.selectbox("Strictness", list(levels), key=f"strictness:{path}:{mtime}",
                             help="How often a stranger may pass: each threshold is the one at "
                                  "which that share of different-person pairs of the "
                                  "checkpoint's validation people score above it.")
        default, meaning = levels[level]
        # One key per checkpoint and strictness: choosing either starts at its threshold.
        threshold = st.slider("Threshold (score ≥ threshold ⇒ same)", lo, hi, default,
                              step=(hi - lo) / 400, format="%.3f",
                              key=f"threshold:{path}:{mtime}:{level}",
                              help="Starts at the strictness's threshold; the range spans the "
                                   "scores it gives.")
        st.caption(meaning if threshold == default else
                   f"A threshold you set ({level}'s is {default:.3f}): its false-accept rate "
                   "was not measured.")
        if len(levels) == 1:
            st.caption(f"No thresholds by false-accept rate in this checkpoint (saved before "
                       f"they were recorded): `python calibrate.py {path}` adds them.")
    return Choice(path, mtime, threshold, half, notice)


def chosen():
    """The sidebar's Choice of this run of the page (set by app.py)."""
    return st.session_state["model"]
