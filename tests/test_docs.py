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
