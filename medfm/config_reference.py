"""The config reference (``CONFIG.md``), generated from the typed schemas so that it cannot drift from them.

Every key of ``medfm pretrain`` (``medfm.pretrain.config.PretrainConfig``, method sections included), ``medfm eval``,
``medfm finetune`` (``medfm.downstream.config``) and ``medfm bench quality`` (``medfm.benchmark``) with its type,
default and the comment beside (or above) its declaration.

    python -m medfm.config_reference            # rewrites CONFIG.md
    python -m medfm.config_reference --check    # exit 1 when CONFIG.md is not what the schemas give
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

from omegaconf import MISSING

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "CONFIG.md"
_FIELD = re.compile(r"^\s+(\w+):\s*[^=#]+?(?:=.*?)?(?:#\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the class source: the comment after the declaration, or the comment lines
    right above it; a field declared in a base dataclass (and not again) has the base's comment."""
    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        comments.update(_own_field_comments(klass))
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").rstrip())
            continue
        match = _FIELD.match(line)
        if match and not stripped.startswith(("def ", "@", "return", "class ")):
            after = (match.group(2) or "").replace("# fmt: skip", "").strip()
            text = " ".join([*above, after]).strip()
            if text:
                comments[match.group(1)] = text
        above = []
    return comments


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return MISSING


def _show(value: Any) -> str:
    if value == MISSING:
        return "**required**"
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):  # enums
        value = value.value
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, list):
        return "`[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value) + "]`"
    if isinstance(value, dict) and not value:
        return "`{}`"
    if value == "":
        return '`""`'
    return f"`{value}`" if value is not None else "`null`"


def section_rows(cls: type, prefix: str = "") -> tuple[list[tuple[str, str, str, str]], list[tuple[str, type]]]:
    """(rows of plain keys, nested dataclass sections) of one schema class."""
    comments = field_comments(cls)
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        default = _default(field)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            nested.append((key, type(default)))
            continue
        hint = hints.get(field.name)
        items = typing.get_args(hint) if typing.get_origin(hint) in (list, dict) else ()
        if items and dataclasses.is_dataclass(items[-1]):  # list[Section] / dict[str, Section]: document one item
            nested.append((f"{key}[]" if typing.get_origin(hint) is list else f"{key}.NAME", items[-1]))
        kind = (field.type.__name__ if isinstance(field.type, type) else str(field.type)).replace("|", "\\|")
        rows.append((key, kind, _show(default), comments.get(field.name, "")))
    return rows, nested


def schema_markdown(title: str, schema: type, intro: str) -> list[str]:
    lines = [f"## {title}", "", intro, ""]
    queue: list[tuple[str, type]] = [("", schema)]
    while queue:
        prefix, cls = queue.pop(0)
        rows, nested = section_rows(cls, f"{prefix}." if prefix else "")
        if rows:
            doc = inspect.getdoc(cls) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
            heading = f"### `{prefix}`" if prefix else "### top level"
            lines += [heading, ""] + ([doc.splitlines()[0], ""] if doc else [])
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
            lines += [f"| `{k}` | `{t}` | {d} | {c} |" for k, t, d, c in rows]
            lines.append("")
        queue = nested + queue
    return lines


def reference_markdown() -> str:
    from medfm.benchmark import QualityConfig
    from medfm.downstream.config import EvalConfig, FinetuneConfig
    from medfm.pretrain.config import PretrainConfig

    lines = [
        "# Config reference",
        "",
        "Generated from the typed schemas by `python -m medfm.config_reference` (a test fails when this file "
        "is out of date). YAML files hold overrides of these defaults; `key=value` arguments go on top. An unknown "
        "key, a wrong type or a missing required value fails before anything runs, naming the key.",
        "",
    ]
    lines += schema_markdown(
        "`medfm pretrain`",
        PretrainConfig,
        "Schema: `pretrain/config.py`; each method's section is declared beside its code in `pretrain/methods/`. Recipes: `configs/pretrain/`. The `derived` section is computed (global batch, scaled lr, step counts) and saved with the run, never set.",
    )
    lines += schema_markdown(
        "`medfm eval`",
        EvalConfig,
        "Schema: `downstream/config.py` (`EvalConfig`). Examples: `configs/downstream/eval_*.yaml`.",
    )
    lines += schema_markdown(
        "`medfm finetune`",
        FinetuneConfig,
        "Schema: `downstream/config.py` (`FinetuneConfig`). Examples: `configs/downstream/finetune_*.yaml`.",
    )
    lines += schema_markdown(
        "`medfm bench quality`",
        QualityConfig,
        "Schema: `medfm/benchmark/config.py` (`QualityConfig`). The benchmark: `bench/quality.yaml`.",
    )
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with CONFIG.md")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.check:
        current = REFERENCE.read_text() if REFERENCE.is_file() else ""
        if current != text:
            print(f"{REFERENCE} is out of date: run python -m medfm.config_reference", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
