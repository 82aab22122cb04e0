"""The "Same person?" page: two photos in, a verdict on their faces out, then the chosen
run's training curves and evaluations (demo_run.py).

The photos reach the page through st.session_state["photo_a"] / ["photo_b"] as
{"name": str, "data": bytes, "rule": optional faces rule}: the upload boxes and the example
button write them there. The score is the model's (FaceModel.score_faces of the two faces
FaceModel.face finds), as verify.py gives it.
"""
import random

import streamlit as st

import dataset
import demo
import demo_run
import faces
import pairs

SIDES = ("a", "b")
# A verdict is a close call when |score - threshold| is under this share of the checkpoint's
# score half-span (how far realistic scores lie from its threshold, see demo.score_scale).
# The same-person and different-people scores of a model that is ~90% accurate overlap
# around the threshold, so a pair that near it is often misjudged: for a cosine model at
# threshold -0.4 the band is ±0.09 (the +0.066 "Same person" a user saw is inside it); for a
# bce model it is ±0.45 logits, a 39-61% probability of "same".
CLOSE_SHARE = 0.15


def verdict(score, threshold, half):
    """(text, same, close): the decision and whether it is a close call (see CLOSE_SHARE)."""
    margin = score - threshold
    same, close = margin >= 0, abs(margin) < CLOSE_SHARE * half
    text = "Verdict: " + ("Same person" if same else "Different people")
    return text + (" (close call)" if close else ""), same, close


def photo_rule(photo):
    return photo.get("rule", faces.UPLOAD_RULE)


def analysed(photo, fm):
    """demo.analyse of one of the page's photos."""
    return demo.analyse(photo["data"], photo["name"], photo_rule(photo), demo.crop_key(fm), fm)


@st.cache_data(max_entries=64, show_spinner=False)
def pair_score(path, mtime, photo_a, photo_b):
    """The model's score of the two photos' faces. Cached so that moving the threshold
    slider does not rerun the network."""
    fm = demo.face_model(path, mtime)
    return fm.score_faces(analysed(photo_a, fm)["crop"], analysed(photo_b, fm)["crop"])


# ------------------------------------------------------------------ example pairs

def pairs_file(data):
    for name in ("pairsDevTest.txt", "pairs.txt"):  # DevTest: pairs no model trained on
        if (data / name).is_file():
            return data / name
    return None


@st.cache_data(show_spinner=False)
def read_pairs(path, mtime, image_dir):
    return pairs.read_lfw(path, image_dir)


def pick_example(found, rng=random):
    """A matched or a mismatched pair (a coin flip) whose two images are on disk, or None."""
    same = rng.random() < 0.5
    pool = [p for p in found if bool(p.same) == same] or found
    for _ in range(20):
        pair = rng.choice(pool)
        if pair.path_a.is_file() and pair.path_b.is_file():
            return pair
    return None


def on_upload(side, key):
    upload = st.session_state.get(key)
    st.session_state[f"photo_{side}"] = None if upload is None else \
        {"name": upload.name, "data": upload.getvalue()}
    st.session_state.pop("example", None)  # the pair is no longer LFW's
    st.session_state.pop("example_error", None)


def on_example():
    data = demo.data_dir()
    path = pairs_file(data)
    if path is None:  # removed since the page was drawn
        st.session_state["example_error"] = f"No pairsDevTest.txt or pairs.txt in {data}"
        return
    try:
        picked = pick_example(read_pairs(str(path), path.stat().st_mtime, data / "images"))
        if picked:
            # LFW labels the centred face, which is also the one the crops were made from.
            photos = [{"name": p.name, "data": p.read_bytes(), "rule": "center"}
                      for p in (picked.path_a, picked.path_b)]
    except (dataset.ProtocolError, OSError) as e:
        st.session_state["example_error"] = f"Cannot read the LFW example pair: {e}"
        return
    if picked is None:
        st.session_state["example_error"] = f"No example pair has both images under {data / 'images'}"
        return
    for side, photo in zip(SIDES, photos):
        st.session_state[f"photo_{side}"] = photo
    st.session_state["example"] = {"same": bool(picked.same), "file": path.name}
    st.session_state.pop("example_error", None)
    # New widget keys empty the upload boxes, so they don't show files no longer in use.
    st.session_state["uploader_nonce"] = st.session_state.get("uploader_nonce", 0) + 1


# ------------------------------------------------------------------ photos, verdict

def show_photo(side, photo, fm):
    """One column: the photo (full file name) with its face box, the aligned crop, or the
    error. Returns demo.analyse's result."""
    result = analysed(photo, fm)
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
    seen = dataset.fit(result["crop"], fm.image_size)  # exactly what the network gets
    st.image(seen.permute(1, 2, 0).numpy(), width=150,
             caption=f"Aligned face the model sees ({fm.image_size}×{fm.image_size})")
    return result


def photo_inputs(fm):
    """Example button, the two upload boxes and each photo under its box; {side: result}."""
    data = demo.data_dir()
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
                             args=(side, key), max_upload_size=demo.MAX_MB,
                             help=f"JPEG or PNG, up to {demo.MAX_MB} MB and "
                                  f"{faces.MAX_PIXELS // 1_000_000} megapixels")
            photo = st.session_state.get(f"photo_{side}")
            if photo:
                results[side] = show_photo(side, photo, fm)
    return results


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
    st.caption(f"{demo.score_meaning(model_config)} Within ±{CLOSE_SHARE * half:.3f} of the "
               "threshold the verdict is a close call: pairs that near it are where the "
               "model errs most.")
    example = st.session_state.get("example")
    if example:
        truth = "the same person" if example["same"] else "different people"
        agree = "agrees" if example["same"] == same else "disagrees"
        st.caption(f"LFW ({example['file']}) says: {truth}; the model {agree}.")


def main():
    choice = demo.chosen()
    fm = choice.model
    verdict_box = st.container()  # filled last, but drawn first: where the eye lands
    results = photo_inputs(fm)
    with verdict_box:
        if len(results) < 2 or any(r["error"] for r in results.values()):
            show_no_verdict(results)
        else:
            score = pair_score(choice.path, choice.mtime, st.session_state["photo_a"],
                               st.session_state["photo_b"])
            show_verdict(score, choice.threshold, choice.half, fm.ckpt["model_config"])
    demo_run.show_run(choice.path)


if __name__ == "__main__":  # st.navigation runs a page file as __main__; tests import it
    main()
