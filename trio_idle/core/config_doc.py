"""The settings tables of ``docs/configuration.md``, rendered from the declarations.

``nox -s docs`` (``python -m trio_idle.core.config_doc docs/configuration.md``) rewrites the
part of the file between the ``options`` markers; ``tests/unit/test_configuration_doc.py``
only compares, so a setting added without regenerating the doc fails the suite. Pure apart
from :func:`main`.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Final

from trio_idle.core.config import GROUPS, OPTIONS

BEGIN: Final = "<!-- options:begin -->"
END: Final = "<!-- options:end -->"


def options_tables() -> str:
    """One markdown table per settings group, every setting with its default."""
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


def render(text: str) -> str:
    """``text`` (the whole document) with the tables between the markers regenerated."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{options_tables()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trio_idle.core.config_doc docs/configuration.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    text = path.read_text()
    new = render(text)
    if new != text:
        path.write_text(new)
        print(f"{path}: settings tables regenerated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
