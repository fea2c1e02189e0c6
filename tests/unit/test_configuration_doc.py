"""docs/configuration.md lists every setting with its default, group by group as
:class:`trio_idle.core.config.Settings` holds them. This test only compares; ``nox -s docs``
regenerates the tables (:mod:`trio_idle.core.config_doc`)."""

from __future__ import annotations

from pathlib import Path

from trio_idle.core.config_doc import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_doc_lists_every_setting_with_its_default() -> None:
    text = DOC.read_text()
    assert text == render(text), "docs/configuration.md is out of date: run `nox -s docs`"
