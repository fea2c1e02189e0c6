"""The environment file is read with systemd's EnvironmentFile= rules (systemd.exec(5)),
so ``/etc/trio-idle/env`` means the same under systemd and ``trio-idle --env-file`` (PM2,
Docker): secrets with ``$``, ``&``, ``#``, quotes and spaces arrive as written.

Where systemd is installed, its own parser checks ours: the environment.d generator runs
the same state machine (``parse_env_file_internal``) on the same bytes; it then expands
``$VAR`` (environment.d(5)), which EnvironmentFile= does not, so that comparison covers
every rule but ``$``, and the ``$`` rule is checked against systemd.exec(5)'s words.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import unavailable
from trio_idle import cli
from trio_idle.core.env_file import EnvFileError, parse_env_file


def parse(data: bytes) -> dict[str, str]:
    return parse_env_file(data).values


# -- systemd.exec(5), "EnvironmentFile=", rule by rule -------------------------------------


def test_comments_blank_lines_and_lines_without_equals_are_ignored() -> None:
    data = b"# comment\n; also a comment\n   # indented comment\n\nNOEQUALS\nA=1\n"
    assert parse(data) == {"A": "1"}


def test_a_hash_inside_a_value_is_part_of_it() -> None:
    assert parse(b"A=x # not a comment\nB=#x\n") == {"A": "x # not a comment", "B": "#x"}


def test_whitespace_around_is_dropped_interior_whitespace_kept() -> None:
    assert parse(b"  A  =  two  words \t \nB=\n") == {"A": "two  words", "B": ""}


def test_unquoted_backslash_keeps_the_next_character() -> None:
    assert parse(b"A=a\\\\b\nB=a\\$b\nC=a\\ \n") == {"A": "a\\b", "B": "a$b", "C": "a "}


def test_unquoted_backslash_newline_continues_the_line() -> None:
    assert parse(b"A=first\\\nsecond\nB=x\n") == {"A": "firstsecond", "B": "x"}


def test_single_quotes_are_verbatim_and_may_span_lines() -> None:
    assert parse(b"A='a \\n $b \"c\" \\'\nB='line1\nline2'\n") == {
        "A": 'a \\n $b "c" \\',
        "B": "line1\nline2",
    }


def test_double_quotes_unescape_only_the_shell_specials() -> None:
    data = b'A="q\\" b\\\\ d\\$ t\\` n\\n"\nB="x\\\ny"\nC="two\nlines"\n'
    assert parse(data) == {"A": 'q" b\\ d$ t` n\\n', "B": "xy", "C": "two\nlines"}


def test_quotes_only_open_a_value_and_parts_join() -> None:
    assert parse(b'A=x"y"z\nB="x"\'y\'z\nC = "a"  \n') == {
        "A": 'x"y"z',
        "B": "xyz",
        "C": "a",
    }


def test_dollar_and_backticks_are_never_expanded() -> None:
    # systemd.exec(5): variable expansion is not performed in EnvironmentFile= files
    assert parse(b"HOME=/x\nA=$HOME\nB=${HOME}\nC=`id`\n") == {
        "HOME": "/x",
        "A": "$HOME",
        "B": "${HOME}",
        "C": "`id`",
    }


def test_invalid_names_are_ignored_and_reported_the_last_assignment_wins() -> None:
    parsed = parse_env_file(b"export A=1\nA B=2\n1A=3\nA=4\nA=5\n")
    assert parsed.values == {"A": "5"}
    assert parsed.ignored == ("export A", "A B", "1A")


def test_a_comment_ending_in_a_backslash_is_flagged() -> None:
    """systemd 254 changed it: before, the next line was part of the comment."""
    parsed = parse_env_file(b"A=1\n# note \\\nB=2\n  ; x\\\r\nC=3\n")
    assert parsed.values == {"A": "1", "B": "2", "C": "3"}
    assert parsed.ambiguous_comments == (2, 4)


def test_crlf_files_read_like_lf_files() -> None:
    assert parse(b"A=1\r\nB= two \r\n") == {"A": "1", "B": "two"}


def test_the_last_line_needs_no_newline() -> None:
    assert parse(b"A=1\nB='x'") == {"A": "1", "B": "x"}


def test_not_utf8_or_nul_is_refused_without_quoting_values() -> None:
    with pytest.raises(EnvFileError, match="line 2 is not valid UTF-8") as bad:
        parse_env_file(b"A=1\nSECRET=s3cr\xff\n", "/etc/trio-idle/env")
    assert "s3cr" not in str(bad.value) and "/etc/trio-idle/env" in str(bad.value)
    with pytest.raises(EnvFileError, match="NUL"):
        parse_env_file(b"A=1\0\n")


# -- the secrets every recipe must carry through unchanged -----------------------------

#: a file as an operator writes it: secrets with $, &, #, quotes, spaces, backslashes
SECRETS_FILE = (
    b"# /etc/trio-idle/env\n"
    b"DATABASE_URL=postgresql://idle:pa$$w&rd%231@127.0.0.1:5432/app\n"
    b"ADMIN_SECRET='it''s a \"secret\" & $HOME'\n"
    b'ENCRYPTION_KEY="key with spaces, $dollar, `tick`, \\"quote\\" & #hash!"\n'
    b"TRIO_IDLE_SIGNING_SECRET=a\\\\b\\ c  \n"
)
SECRETS = {
    "DATABASE_URL": "postgresql://idle:pa$$w&rd%231@127.0.0.1:5432/app",
    "ADMIN_SECRET": 'its a "secret" & $HOME',
    "ENCRYPTION_KEY": 'key with spaces, $dollar, `tick`, "quote" & #hash!',
    "TRIO_IDLE_SIGNING_SECRET": "a\\b c",
}


def test_secrets_arrive_as_written() -> None:
    assert parse(SECRETS_FILE) == SECRETS


def test_the_old_shell_recipe_mangled_them(tmp_path: Path) -> None:
    """Why PM2 no longer sources the file: ``set -a; . file`` expands ``$`` and treats
    ``&`` as a command separator (the values differ, or the shell fails)."""
    path = tmp_path / "env"
    path.write_bytes(SECRETS_FILE)
    result = subprocess.run(
        ["sh", "-c", 'set -a; . "$0" 2>/dev/null; printf %s "$DATABASE_URL"', str(path)],
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/x"},
        check=False,
    )
    assert result.stdout.decode() != SECRETS["DATABASE_URL"]


# -- systemd's own parser ----------------------------------------------------------------

GENERATOR = "/usr/lib/systemd/user-environment-generators/30-systemd-environment-d-generator"

#: every rule above but "$" (the generator expands it; EnvironmentFile= does not) and an
#: empty value (the generator drops it; EnvironmentFile= sets the variable empty)
NO_DOLLAR_FILE = (
    b"# comment\n"
    b"; semicolon comment\n"
    b"  T_SPACES  =  two  words \t \n"
    b"T_HASH=x # y\n"
    b"T_AMP=a&b|c;d<e>f\n"
    b"T_SINGLE='it''s \"q\" \\ & # x'\n"
    b'T_DOUBLE="q\\" b\\\\ t\\` n\\n & #"\n'
    b"T_JOIN=first\\\nsecond\n"
    b"T_ESCAPED=a\\\\b\\ c\\#  \n"
    b"T_PARTS=\"x\"'y'z\n"
    b"T_CRLF=v\r\n"
    b"T_LAST=1\n"
    b"T_LAST=2\n"
    b"export T_EXPORTED=1\n"
)


def systemd_parse(path: Path, tmp_path: Path) -> dict[str, str]:
    """What systemd's parser makes of ``path``: the generator's output (shell-quoted
    ``KEY=VALUE`` lines), read back with double-quote rules."""
    config = tmp_path / "config"
    (config / "environment.d").mkdir(parents=True)
    shutil.copy(path, config / "environment.d" / "50-test.conf")
    result = subprocess.run(
        [GENERATOR],
        env={"XDG_CONFIG_HOME": str(config), "HOME": str(tmp_path)},
        capture_output=True,
        check=True,
        timeout=30,
    )
    return {k: v for k, v in parse(result.stdout).items() if k.startswith("T_")}


def test_systemd_reads_the_file_as_we_do(tmp_path: Path) -> None:
    if not os.access(GENERATOR, os.X_OK):
        unavailable("systemd's environment.d generator not found (apt-get install systemd)")
    path = tmp_path / "env"
    path.write_bytes(NO_DOLLAR_FILE)
    ours = parse(NO_DOLLAR_FILE)
    assert systemd_parse(path, tmp_path) == ours
    # and the comparison has teeth: the file exercises every rule
    assert ours["T_SPACES"] == "two  words" and ours["T_JOIN"] == "firstsecond"
    assert ours["T_DOUBLE"] == 'q" b\\ t` n\\n & #' and "T_EXPORTED" not in ours


# -- what the warnings about ignored lines may show ----------------------------------------


def test_an_ignored_line_that_may_be_part_of_a_wrapped_secret_is_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A value wrapped onto a second line (a pasted key or token) makes that line an
    assignment with an invalid name when the value holds ``=``: the warning must say a
    line was ignored without quoting it. A mistaken name (``export A``) is still named."""
    wrapped_half = "Zm9vYmFy+S3ntinel/wrapped-key-half"
    path = tmp_path / "env"
    path.write_text(f"ADMIN_SECRET=first-half\n{wrapped_half}==\nexport ODD=1\n")
    code = cli.main(["check", "--env-file", str(path)], {})
    _, err = capsys.readouterr()
    assert code == 2  # ENCRYPTION_KEY and the rest are missing
    assert wrapped_half not in err
    assert "not a variable name" in err and "may be part of a value" in err
    assert "ignoring 'export ODD'" in err
