"""Class names and prompt templates for zero-shot classification, shipped as data.

The lists are the benchmark protocol: OpenAI's curated ImageNet class names and the
CLIP paper's prompt templates, one entry per line in `jaxclip/evaluate/assets/`, each
file opening with `#` lines that name its source. A user's own list is a text file in
the same format:

    class_names("imagenet")          # 1,000 names, in class-index order
    templates("imagenet")            # the paper's 80 templates, '{}' for the name
    templates("simple")              # OpenAI's 7 forward-selected templates
    class_names("my_classes.txt")    # any file: one name per line, '#' comments
    class_names("my_classes.json")   # a JSON list, or {"classes": [...]}
    class_names('["cat", "dog"]')    # an inline JSON list (what spec() stores for one)
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os

CLASS_NAME_SETS = ("imagenet", "cifar10", "cifar100")
TEMPLATE_SETS = ("imagenet", "cifar10", "cifar100", "simple")


def class_names(dataset: str) -> list[str]:
    """The class names of a known dataset (CLASS_NAME_SETS) or of a text file."""
    return list(_entries(dataset, "classnames", CLASS_NAME_SETS))


def templates(name: str) -> list[str]:
    """Prompt templates ('{}' marks the class name), known (TEMPLATE_SETS) or a file.

    Each template must hold exactly one '{}' and no other braces, so that
    `template.format(class_name)` is the prompt.
    """
    entries = _entries(name, "templates", TEMPLATE_SETS)
    for number, template in enumerate(entries, 1):
        if template.count("{}") != 1 or template.count("{") + template.count("}") != 2:
            raise ValueError(
                f"template {number} of {name!r} is {template!r}: a template needs "
                "exactly one '{}' (where the class name goes) and no other braces"
            )
    return list(entries)


@functools.cache
def _packaged(filename: str) -> tuple[str, ...]:
    resource = importlib.resources.files("jaxclip.evaluate.assets") / filename
    return parse_list(resource.read_text(encoding="utf-8"), filename)


def _entries(name: str, kind: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """A packaged set, an inline JSON list, or a file (text, one per line, or JSON)."""
    if name in known:
        return _packaged(f"{name}_{kind}.txt")
    if name.lstrip().startswith("["):
        return parse_json_list(name, kind, "the inline list")
    if os.path.isfile(name):  # read on every call: the user may edit it
        with open(name, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM
            text = f.read()
        if name.endswith(".json"):
            return parse_json_list(text, kind, name)
        return parse_list(text, name)
    noun = "class names" if kind == "classnames" else "templates"
    raise ValueError(
        f"unknown {noun} {name!r}: expected one of {list(known)}, an inline JSON list "
        '(\'["cat", "dog"]\'), or the path of a text file with one entry per line '
        "or of a .json file holding a list"
    )


# Keys a JSON file may hold its list under, besides being the list itself.
JSON_KEYS = {"classnames": ("classes", "classnames"), "templates": ("templates",)}


def parse_json_list(text: str, kind: str, source: str) -> tuple[str, ...]:
    """Entries of a JSON list of strings, or of an object holding one under
    `JSON_KEYS[kind]` (e.g. `{"classes": [...]}`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not valid JSON: {error}") from None
    if isinstance(value, dict):
        keys = [key for key in JSON_KEYS[kind] if key in value]
        if not keys:
            raise ValueError(
                f"{source} is a JSON object without a list under any of "
                f"{list(JSON_KEYS[kind])}"
            )
        value = value[keys[0]]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source} must hold a JSON list of strings")
    entries = tuple(entry.strip() for entry in value)
    if not entries or not all(entries):
        raise ValueError(f"{source}: the list is empty or holds a blank entry")
    return entries


def parse_list(text: str, source: str = "<text>") -> tuple[str, ...]:
    """Entries of a list file: one per line, '#' lines skipped, whitespace stripped.

    A blank line among the entries is refused rather than skipped: in a class-name
    file it would shift every later class index by one.
    """
    entries = []
    for number, line in enumerate(text.rstrip().splitlines(), 1):
        if line.startswith("#"):
            continue
        entry = line.strip()
        if not entry:
            raise ValueError(f"{source}: line {number} is blank")
        entries.append(entry)
    if not entries:
        raise ValueError(f"{source} lists no entries")
    return tuple(entries)
