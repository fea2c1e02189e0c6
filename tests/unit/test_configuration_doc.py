"""docs/configuration.md lists every setting with its default, group by group as
:class:`trio_idle.core.config.Settings` holds them (regenerate with
``UPDATE_DOCS=1 python -m pytest tests/unit/test_configuration_doc.py``)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from trio_idle.core.config import GROUPS, OPTIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def options_tables() -> str:
    sections: list[str] = []
    for name, group in GROUPS.items():
        summary = " ".join(inspect.cleandoc(group.__doc__ or "").split("\n\n")[0].split())
        summary = summary.removesuffix(".")
        lines = [
            f"### {summary}",
            "",
            f"In code: `settings.{name}` (`{group.__name__}`).",
            "",
            "| Variable | Flag | Default | Meaning |",
            "|---|---|---|---|",
        ]
        for o in OPTIONS:
            if o.group != name:
                continue
            default = "—" if o.default is None else f"`{o.default}`"
            if o.field == "connections_query":
                default = 'the active rows of `"MailConnection"` (below)'
            flag = f"`{o.flag}`" if o.flag else "(env only)"
            meaning = o.help.replace("|", "\\|") + (" **Secret.**" if o.secret else "")
            lines.append(f"| `{o.env}` | {flag} | {default} | {meaning} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def test_configuration_doc_lists_every_setting_with_its_default() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    expected = f"{head}{BEGIN}\n{options_tables()}\n{END}{tail}"
    if os.environ.get("UPDATE_DOCS") == "1":
        DOC.write_text(expected)
    assert text == expected, "docs/configuration.md is out of date: run with UPDATE_DOCS=1"
