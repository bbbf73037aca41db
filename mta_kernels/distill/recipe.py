"""Recipes: the published training settings as JSON files (``mta-distill distill --recipe NAME``).

A recipe file (``mta_kernels/distill/recipes/<name>.json``, shipped as package data) holds ``name``,
``description``, ``source`` (the published script it was read from), ``models`` (the published teacher
and student, for reference: the run still takes local ``--teacher``/``--student``), ``config``
(:class:`~mta_kernels.distill.config.TrainConfig` fields) and ``not_reproduced`` (what of the published
run this loop does not do; printed as warnings when the recipe is used). ``--recipe`` also takes the
path of such a file. Values given on the command line override the recipe's (docs/recipes.md).
"""

from __future__ import annotations

import json
import os
from importlib import resources

from mta_kernels.distill.config import DistillError, TrainConfig

RECIPE_KEYS = ("name", "description", "source", "models", "config", "not_reproduced")
# Fields a recipe may not set: they name this run's files and models, not a published setting.
RUN_FIELDS = ("mode", "out", "data", "eval_data", "student", "teacher", "student_tokenizer",
              "teacher_tokenizer", "resume", "overwrite", "stop_at", "device", "recipe")  # fmt: skip


def recipe_names() -> list[str]:
    """The shipped recipes, sorted."""
    root = resources.files("mta_kernels.distill.recipes")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_recipe(name: str) -> dict:
    """A shipped recipe by name, or a recipe file by path; checked against :class:`TrainConfig`."""
    if name.endswith(".json") or os.sep in name:
        path = name
        if not os.path.isfile(path):
            raise DistillError(f"recipe file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        if name not in recipe_names():
            raise DistillError(
                f"unknown recipe {name!r}: one of {', '.join(recipe_names())} (or a .json path)"
            )
        text = (resources.files("mta_kernels.distill.recipes") / f"{name}.json").read_text(encoding="utf-8")
        path = f"{name}.json"
    try:
        recipe = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DistillError(f"recipe {path!r} is not valid JSON ({exc})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("config"), dict):
        raise DistillError(f"recipe {path!r} has no 'config' object")
    unknown = sorted(set(recipe) - set(RECIPE_KEYS))
    if unknown:
        raise DistillError(f"recipe {path!r}: unknown keys {unknown} (allowed: {list(RECIPE_KEYS)})")
    fields = TrainConfig.__dataclass_fields__
    for key in recipe["config"]:
        if key not in fields:
            raise DistillError(f"recipe {path!r}: {key!r} is not a training setting")
        if key in RUN_FIELDS:
            raise DistillError(f"recipe {path!r}: {key!r} names this run's files or models, not a setting")
    return recipe


def apply_recipe(recipe: dict, explicit: dict) -> dict:
    """The config values of a run: the recipe's, then ``explicit`` (the flags given on the command line).

    A flag that replaces a recipe value of another name clears it: ``--pairs`` the recipe's ``preset``
    (and the reverse), ``--steps`` its ``epochs``.
    """
    values = dict(recipe["config"])
    if "pairs" in explicit:
        values.pop("preset", None)
    if "preset" in explicit:
        values.pop("pairs", None)
    if "steps" in explicit and "epochs" not in explicit:
        values["epochs"] = None
    values.update(explicit)
    values["recipe"] = recipe.get("name")
    return values
