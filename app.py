"""Web demo: are the faces in two photos the same person, and who is this? Run:
streamlit run app.py      (or `make app`)

Streamlit's multipage layout. This file is the entry point and the frame both pages share:
the page picker (st.navigation), the title, and the sidebar's model and threshold
(demo.sidebar), kept as they are when the page changes. The pages:
- demo_pages/same_person.py, "Same person?": 1:1 verification of two photos, then the
  chosen run's training curves and evaluations (demo_run.py);
- demo_pages/who_is_this.py, "Who is this?": 1:N identification of every face of a photo
  against a gallery of named people (demo_gallery.py builds the galleries).
demo.py holds what they share: photos, the cached inference.FaceModel, the score's scale.

Page code only. The faces, their embeddings and their scores come from inference.FaceModel,
the gallery, its embedding cache and its search from identify.py, the LFW example pairs from
pairs.py: what verify.py and identify.py use, so that the pages and the command line agree
on the same photos.
"""
import streamlit as st

import demo

# (page file, its title, what the browser tab adds, one line under the title)
PAGES = (
    ("demo_pages/same_person.py", "Same person?", "LFW face verification",
     "Two photos in; a siamese network trained on LFW scores their faces."),
    ("demo_pages/who_is_this.py", "Who is this?", "LFW face identification",
     "Every face of a photo, searched among the people of a gallery; a siamese network "
     "trained on LFW scores them."),
)


def main():
    page = st.navigation([st.Page(file, title=title, default=i == 0)
                          for i, (file, title, _, _) in enumerate(PAGES)])
    _, title, tab, blurb = next(p for p in PAGES if p[1] == page.title)
    st.set_page_config(page_title=f"{title} {tab}", layout="wide")
    st.title(title)
    st.caption(f"{blurb} Photos stay on this machine.")
    # Drawn here, not by the pages: widgets of the entry point keep their values when the
    # page changes, so the model and threshold chosen on one page hold on the other.
    st.session_state["model"] = choice = demo.sidebar()
    if choice.notice:
        st.info(choice.notice)
    page.run()


if __name__ == "__main__":  # streamlit runs this file as __main__; tests import it
    main()
