"""The documentation must say what the code does."""
import ast
import re
from pathlib import Path

import pytest

import trainer
import trainer2
import trainer_pretrained
import recipes

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_table_is_made_from_the_code():
    """RECIPE.md's hyperparameter table is recipes.markdown_table(): `python recipes.py`."""
    text = (ROOT / "RECIPE.md").read_text()
    start, end = recipes.MARKERS
    assert text.count(start) == text.count(end) == 1
    table = text.split(start)[1].split(end)[0].strip()
    assert table == recipes.markdown_table(), "RECIPE.md is stale: run python recipes.py"


def test_the_table_has_every_name_with_every_trainers_values():
    t2, t1 = recipes.defaults_of(vars(trainer2)), recipes.defaults_of(vars(trainer))
    tp = recipes.defaults_of(vars(trainer_pretrained))
    rows = {}
    for line in recipes.markdown_table().splitlines()[2:]:
        found = re.match(r"^\| `(\w+)` \| `(.+?)` \| `(.+?)` \| `(.+?)` \| (.*) \|$", line)
        rows[found.group(1)] = tuple(ast.literal_eval(found.group(k)) for k in (2, 3, 4))
        assert found.group(5), f"{found.group(1)} has no meaning"
    assert set(rows) == set(t2) == set(t1) == set(tp)
    assert all(rows[k] == (t2[k], tp[k], t1[k]) for k in rows)
    assert rows["lr"] == (0.1, 0.05, 1e-4) and rows["arc_margin"] == (0.5, 0.5, 0.5)
    assert rows["model"] == ("compact", "efficientnet_lite0", "koch")


@pytest.mark.parametrize("child, parent", [("trainer2.py", trainer), ("trainer_pretrained.py", trainer2)])
def test_a_trainer_file_lists_only_what_differs_from_the_one_it_imports(child, parent):
    """nanoGPT's override pattern: every assignment in a trainer file changes its parent's value."""
    base = recipes.defaults_of(vars(parent))
    tree = ast.parse((ROOT / child).read_text())
    module = trainer2 if child == "trainer2.py" else trainer_pretrained
    names = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    assert names and all(getattr(module, n) != base[n] for n in names), names


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
