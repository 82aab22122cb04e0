"""The documentation must say what the code does."""
import ast
import re
from pathlib import Path

import trainer
import trainer2
import training

ROOT = Path(__file__).resolve().parent.parent


def recipe_table():
    """{name: (trainer2 default, trainer default)} from RECIPE.md's hyperparameter table."""
    rows = {}
    for line in (ROOT / "RECIPE.md").read_text().splitlines():
        m = re.match(r"^\| `(\w+)` \| `(.+?)` \| `(.+?)` \|", line)
        if m:
            rows[m.group(1)] = (ast.literal_eval(m.group(2)), ast.literal_eval(m.group(3)))
    return rows


def test_recipe_table_matches_both_trainers():
    table = recipe_table()
    t2, t1 = training.hyperparameters(vars(trainer2)), training.hyperparameters(vars(trainer))
    assert set(table) == set(t2), set(table) ^ set(t2)
    for name, (v2, v1) in table.items():
        assert (v2, v1) == (t2[name], t1[name]), name


def test_readme_quick_start_and_ci_use_the_make_targets():
    readme = (ROOT / "README.md").read_text()
    assert "make train" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    targets = set(re.findall(r"^([a-z0-9]+):", (ROOT / "Makefile").read_text(), re.M))
    assert {"setup", "data", "crop", "train", "test", "evaluate", "app"} <= targets


def anchors(markdown):
    """GitHub's anchors of a document's headings."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_every_link_into_recipe_names_a_heading_and_the_ablation_table_has_its_place():
    readme, recipe = (ROOT / "README.md").read_text(), (ROOT / "RECIPE.md").read_text()
    links = re.findall(r"\(RECIPE\.md#([\w\-]+)\)", readme)
    assert "the-old-projects-findings-rerun-ablationspy" in links
    assert set(links) <= anchors(recipe), set(links) - anchors(recipe)
    assert recipe.count("<!-- ablations:start -->") == recipe.count("<!-- ablations:end -->") == 1
    assert "python ablations.py" in readme and "ablations:" in (ROOT / "Makefile").read_text()
