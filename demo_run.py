"""The chosen checkpoint's training run, as the "Same person?" page shows it below the
verdict: its curves (logs/<run>/metrics.csv) and its evaluate.py results
(logs/<run>/eval-*/results.json and roc.png), the honest evaluation first."""
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from demo import not_regular, percent, regular_file
from runtime import is_number


def show_curves(run_dir):
    """Validation accuracy/AUC, training loss and validation loss: three charts, as the two
    losses are different quantities on different scales (training 25 -> 1.3, validation 0.17)."""
    path = run_dir / "metrics.csv"
    if path.exists() and not regular_file(path):
        st.warning(not_regular(path))
        return
    try:
        rows = pd.read_csv(path).set_index("epoch")
        charts = (("Validation accuracy and AUC", ["accuracy", "auc"]),
                  ("Training loss", ["train_loss"]), ("Validation loss", ["loss"]))
        for col, (title, keys) in zip(st.columns(3), charts):
            col.caption(f"{title} by epoch")
            col.line_chart(rows[keys].rename(columns={"train_loss": "training loss",
                                                      "loss": "validation loss"}))
    except FileNotFoundError:
        st.info("No metrics.csv in this run yet.")
    except (ValueError, KeyError, OSError) as e:  # being written, or from another version
        st.warning(f"Cannot read {path}: {e}")


def read_evaluations(run_dir, checkpoint):
    """[(folder, report)] of the run's evaluate.py results, the honest ones first: not
    contaminated (no test person seen in training), then unchecked, then contaminated; then
    those of this checkpoint file; then newest. Unreadable ones are warned about."""
    found = []
    for path in run_dir.glob("eval-*/results.json"):
        if not regular_file(path):
            st.warning(not_regular(path))
            continue
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
    if isinstance(kfold, dict) and is_number(kfold.get("mean")):
        figures["Accuracy (10-fold)"] = (f"{percent(kfold['mean'])} ± "
                                         f"{percent(kfold.get('stderr') or 0)}")
    for key, label, fmt in (("auc", "AUC", "{:.3f}"), ("eer", "EER", None),
                            ("tar@far=1e-3", "TAR @ FAR 0.1%", None)):
        value = report.get(key)
        if is_number(value):
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
    if regular_file(folder / "roc.png"):
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
