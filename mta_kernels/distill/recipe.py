"""Recipes: the published training settings as JSON files (``mta-distill distill --recipe NAME``).

A recipe file (``mta_kernels/distill/recipes/<name>.json``, shipped as package data) holds ``name``,
``description``, ``source`` (the published script it was read from), ``models`` (the published teacher
and student, for reference: the run still takes local ``--teacher``/``--student``), ``config``
(:class:`~mta_kernels.distill.config.TrainConfig` fields) and ``not_reproduced`` (what of the published
run this loop does not do; printed as warnings when the recipe is used). ``--recipe`` also takes the
path of such a file. Values given on the command line override the recipe's (docs/recipes.md).

A run configuration file (``mta-distill distill --config run.yaml``, or ``.json``) has the same schema;
its ``config`` may also name this run's files and models (``data``, ``teacher``, ``out``, ...). Layers,
later wins: the recipe, then the file, then the flags given on the command line.
"""

from __future__ import annotations

import difflib
import json
import os
from importlib import resources
from typing import Any

from mta_kernels.distill.config import DistillError, TrainConfig, check_field, field_kinds
from mta_kernels.distill.files import read_text

RECIPE_KEYS = ("name", "description", "source", "models", "config", "not_reproduced")
# Fields a recipe may not set: they name this run's files and models, not a published setting.
RUN_FIELDS = ("mode", "out", "data", "eval_data", "student", "teacher", "student_tokenizer",
              "teacher_tokenizer", "resume", "overwrite", "stop_at", "device", "recipe")  # fmt: skip
# Fields a run configuration file may not set either: the sub-command decides them.
CONFIG_FILE_FORBIDDEN = ("mode", "recipe")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
MAX_CONFIG_BYTES = 1 << 20  # a run configuration or recipe is a few hundred bytes


def recipe_names() -> list[str]:
    """The shipped recipes, sorted."""
    root = resources.files("mta_kernels.distill.recipes")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def is_recipe_path(name: str) -> bool:
    """Whether ``--recipe`` names a file (a ``.json`` path) rather than a shipped recipe."""
    return name.endswith(".json") or os.sep in name


def load_recipe(name: str) -> dict:
    """A shipped recipe by name, or a recipe file by path; checked against :class:`TrainConfig`."""
    if is_recipe_path(name):
        path = name
        text = read_text(path, "recipe file", max_bytes=MAX_CONFIG_BYTES)
    else:
        if name not in recipe_names():
            raise DistillError(
                f"unknown recipe {name!r}: one of {', '.join(recipe_names())} (or a .json path)"
            )
        text = (resources.files("mta_kernels.distill.recipes") / f"{name}.json").read_text(encoding="utf-8")
        path = f"{name}.json"
    try:
        recipe = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DistillError(f"recipe {path!r} is not valid JSON ({exc})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("config"), dict):
        raise DistillError(f"recipe {path!r} has no 'config' object")
    _check_schema(recipe, f"recipe {path!r}", RUN_FIELDS)
    return recipe


def _check_schema(doc: dict, what: str, forbidden: tuple[str, ...]) -> None:
    """Top-level keys, then every ``config`` key: a known field, not ``forbidden``, of the right type."""
    unknown = sorted(repr(k) for k in doc if k not in RECIPE_KEYS)
    if unknown:
        raise DistillError(f"{what}: unknown keys {', '.join(unknown)} (allowed: {list(RECIPE_KEYS)})")
    for key in ("name", "description", "source"):
        if key in doc and not isinstance(doc[key], str):
            raise DistillError(f"{what}: {key!r} must be text, got {doc[key]!r}")
    notes = doc.get("not_reproduced", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise DistillError(f"{what}: 'not_reproduced' must be a list of texts, got {notes!r}")
    fields = TrainConfig.__dataclass_fields__
    valid = sorted(k for k in fields if k not in forbidden)
    for key in doc["config"]:
        if not isinstance(key, str):
            raise DistillError(
                f"{what}: the key {key!r} is not a training setting; valid keys: {', '.join(valid)}"
            )
        if key not in fields:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DistillError(
                f"{what}: {key!r} is not a training setting{hint}; valid keys: {', '.join(valid)}"
            )
        if key in forbidden:
            why = (
                "names this run's files or models, not a setting"
                if key in RUN_FIELDS
                else "is set by the command"
            )
            raise DistillError(f"{what}: {key!r} {why} here")
        doc["config"][key] = _typed(doc["config"][key], key, what)


def _typed(value: Any, key: str, what: str) -> Any:
    """``value`` of field ``key`` converted where a file format cannot say it (YAML 1.1 reads ``1e-4``,
    without a dot, as a string; ``kd_chunk: 4096`` is a number), then checked against the option table
    (:func:`~mta_kernels.distill.config.check_field`: type, finiteness, range)."""
    kinds = field_kinds(key)
    if isinstance(value, str) and "str" not in kinds:
        for kind, conv in (("int", int), ("float", float)):
            if kind in kinds:
                try:
                    value = conv(value)
                    break
                except ValueError:
                    pass
    elif isinstance(value, int) and not isinstance(value, bool):
        if "str" in kinds:
            value = str(value)
        elif "float" in kinds and "int" not in kinds:
            value = float(value)
    try:
        check_field(key, value, repr(key))
    except DistillError as exc:
        raise DistillError(f"{what}: {exc}") from None
    return value


def load_config_file(path: str) -> dict:
    """A run configuration file (JSON, or YAML with PyYAML): the recipe schema, run fields allowed.

    Returns the parsed document (``config`` values type-checked against :class:`TrainConfig`).
    """
    if not path.lower().endswith(CONFIG_SUFFIXES):
        raise DistillError(f"--config {path!r}: the file name must end in {', '.join(CONFIG_SUFFIXES)}")
    text = read_text(path, "--config file", max_bytes=MAX_CONFIG_BYTES)
    if path.lower().endswith(".json"):
        try:
            doc = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise DistillError(f"--config {path!r} is not valid JSON ({exc})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise DistillError(
                f"--config {path!r}: reading YAML needs PyYAML (pip install pyyaml, or the 'distill' "
                "extra), or write the file as JSON"
            ) from None
        try:
            doc = yaml.safe_load(text)
        except (yaml.YAMLError, RecursionError) as exc:
            raise DistillError(f"--config {path!r} is not valid YAML ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise DistillError(
            f"--config {path!r} has no 'config' mapping (the recipe schema: {{config: {{lr: ..., ...}}}}, "
            "see `mta-distill recipes --show NAME`)"
        )
    _check_schema(doc, f"--config {path!r}", CONFIG_FILE_FORBIDDEN)
    return doc


def _override(values: dict, newer: dict) -> dict:
    """``values`` updated by ``newer``; a value of another name that ``newer`` replaces is cleared:
    ``pairs`` clears ``preset`` (and the reverse), ``steps`` clears ``epochs``."""
    values = dict(values)
    if "pairs" in newer:
        values.pop("preset", None)
    if "preset" in newer:
        values.pop("pairs", None)
    if "steps" in newer and "epochs" not in newer:
        values["epochs"] = None
    values.update(newer)
    return values


def merge_layers(layers: list[dict]) -> dict:
    """Config values of several layers (recipe config, file config, explicit flags), later wins."""
    values: dict = {}
    for layer in layers:
        values = _override(values, layer)
    return values


def apply_recipe(recipe: dict, explicit: dict) -> dict:
    """The config values of a run: the recipe's, then ``explicit`` (the flags given on the command line).

    A flag that replaces a recipe value of another name clears it: ``--pairs`` the recipe's ``preset``
    (and the reverse), ``--steps`` its ``epochs``.
    """
    values = merge_layers([recipe["config"], explicit])
    values["recipe"] = recipe.get("name")
    return values
