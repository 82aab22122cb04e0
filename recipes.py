"""Recipes: where every hyperparameter's default lives, and the table made from them.

- trainer.py's globals are the base recipe (the paper's); trainer2.py imports them and
  changes only what differs (nanoGPT's override pattern).
- Each backbone's and loss's own settings have their defaults in their registry entry
  (backbones.py, losses.py); a trainer file may set them like any other global.
- The benchmark's and the ablations' recipes are named lists of --name=value overrides on
  trainer2.py (experiments.py, ablations.py), never copies of these values.

`python recipes.py` rewrites RECIPE.md's hyperparameter table from the code;
tests/test_docs.py fails when the table is out of date.
"""
import io
import re
import sys
import tokenize
from pathlib import Path

import backbones
import losses
from runtime import write_atomic

HERE = Path(__file__).resolve().parent
MARKERS = ("<!-- hyperparameters:start -->", "<!-- hyperparameters:end -->")


def hyperparameters(namespace):
    """The plain globals of a trainer file: names not starting with '_' holding simple values."""
    return {k: v for k, v in namespace.items() if not k.startswith("_")
            and isinstance(v, (bool, int, float, str, type(None)))}


def registry_settings():
    """Every backbone's, loss's and batch sampler's own settings: name -> (default, meaning)."""
    out = {}
    for entry in backbones.BACKBONES.values():
        out.update(entry.settings)
    out.update(losses.all_settings())
    return out


def defaults_of(namespace):
    """A trainer's recipe: the registries' defaults, then the trainer file's globals."""
    own = hyperparameters(namespace)
    return {**own, **{k: d for k, (d, _) in registry_settings().items() if k not in own}}


def comments(path):
    """{name: its trailing comment} for the `name = value  # comment` lines of a file."""
    out, line_of, last = {}, {}, None
    tokens = tokenize.generate_tokens(io.StringIO(Path(path).read_text()).readline)
    for tok in tokens:
        if tok.type == tokenize.NAME and tok.start[1] == 0:
            line_of[tok.start[0]], last = tok.string, None
        elif tok.type == tokenize.COMMENT and tok.start[0] in line_of:
            last = line_of[tok.start[0]]
            out[last] = tok.string.lstrip("# ").strip()
        elif tok.type == tokenize.COMMENT and last and tok.start[1] > 0:  # an indented go-on
            out[last] += " " + tok.string.lstrip("# ").strip()
        elif tok.type == tokenize.COMMENT:
            last = None
    return out


def registry_meanings():
    """{setting: what it means, per owner}, e.g. 'koch: dropout ...; compact: dropout ...'."""
    said = {}
    for name, entry in backbones.BACKBONES.items():
        for key, (_, meaning) in entry.settings.items():
            said.setdefault(key, {}).setdefault(meaning, []).append(name)
    for kind, (_, own) in losses.BATCHES.items():
        users = [n for n, c in losses.LOSSES.items() if c.batches == kind]
        for key, (_, meaning) in own.items():
            said.setdefault(key, {}).setdefault(meaning, []).extend(users)
    for name, cls in losses.LOSSES.items():
        for key, (_, meaning) in cls.settings.items():
            said.setdefault(key, {}).setdefault(meaning, []).append(name)
    return {key: "; ".join(f"{', '.join(who)} only: {meaning}" for meaning, who in by.items())
            for key, by in said.items()}


def meanings(*paths):
    """What each name means: the first file's comment that has one, else its registry's."""
    out = registry_meanings()
    for path in reversed(paths):
        out.update({k: v for k, v in comments(path).items() if v})
    return out


def help_text(namespace):
    """`python trainer2.py --help`: every name, its value in this recipe, and its meaning."""
    cfg, about = defaults_of(namespace), meanings(namespace["__file__"], HERE / "trainer.py")
    width = max(map(len, cfg))
    lines = [f"{Path(namespace['__file__']).name}: every hyperparameter, as --name=value "
             "(backbones.py and losses.py own their settings' defaults)"]
    lines += [f"  {k:<{width}}  {v!r:<18} {about.get(k, '')}" for k, v in cfg.items()]
    return "\n".join(lines)


def markdown_table():
    """RECIPE.md's table: each name, its value in trainer2.py, trainer_pretrained.py and
    trainer.py, and its meaning."""
    import trainer
    import trainer2
    import trainer_pretrained
    t2, t1 = defaults_of(vars(trainer2)), defaults_of(vars(trainer))
    tp = defaults_of(vars(trainer_pretrained))
    about = meanings(HERE / "trainer.py", HERE / "trainer2.py", HERE / "trainer_pretrained.py")
    rows = ["| name | `trainer2.py` | `trainer_pretrained.py` | `trainer.py` | meaning |",
            "| --- | --- | --- | --- | --- |"]
    rows += [f"| `{k}` | `{t2[k]!r}` | `{tp[k]!r}` | `{t1[k]!r}` | {about.get(k, '')} |"
             for k in t2]
    return "\n".join(rows)


def write_recipe_table(path=HERE / "RECIPE.md"):
    text = Path(path).read_text()
    start, end = (re.escape(m) for m in MARKERS)
    new = re.sub(f"{start}.*?{end}", lambda _: f"{MARKERS[0]}\n{markdown_table()}\n{MARKERS[1]}",
                 text, flags=re.S)
    write_atomic(path, new)
    return new != text


if __name__ == "__main__":
    changed = write_recipe_table()
    print("RECIPE.md: hyperparameter table " + ("rewritten" if changed else "already current"))
    sys.exit(0)
