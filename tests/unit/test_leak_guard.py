"""The suite-wide leak guard itself (tests/leak_guard.py): a test whose output holds a
token a test server issued, or whose backend received a sentinel, fails.

Each case runs as its own pytest process on a small test file, with the guard loaded as
a plugin, and the outcome pytest reports is checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CASES = """
import httpx
import trio

from trio_idle_testing.backend import Reply, ScanBackend
from trio_idle_testing.oauth_server import OAuthTestServer

PLAIN_TOKEN = "plain-access-token-without-any-sentinel-0042"


async def post(backend, path, body):
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.post(
            backend.url + path, content=body, headers={"x-admin-secret": "adm"}
        )


def with_backend(body_of_test):
    async def main():
        backend = ScanBackend("adm", strict=False)
        backend.token_reply = lambda request: Reply(
            json={"accessToken": PLAIN_TOKEN, "expiresAt": 4e9}
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.serve)
            await body_of_test(backend)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_health_report_with_a_sentinel():
    async def body(backend):
        report = b'{"connectionId":"c","message":"NO S3ntinel-pw-reliability"}'
        await post(backend, backend.status_path, report)

    with_backend(body)


def test_a_scan_body_with_an_issued_token():
    async def body(backend):
        reply = await post(backend, backend.token_path, b'{"connectionId":"c"}')
        token = reply.json()["accessToken"]
        await post(backend, backend.path, ('{"email":"a","note":"%s"}' % token).encode())

    with_backend(body)


def test_printing_a_token_the_backend_issued():
    async def body(backend):
        reply = await post(backend, backend.token_path, b'{"connectionId":"c"}')
        print("got", reply.json()["accessToken"])

    with_backend(body)


def test_printing_a_refresh_token_of_a_grant():
    grant = OAuthTestServer("client", "secret").add_grant("alice")
    print("refresh token:", grant.refresh_token)


def test_clean():
    async def body(backend):
        reply = await post(backend, backend.token_path, b'{"connectionId":"c"}')
        assert reply.status_code == 200
        await post(backend, backend.path, b'{"email":"a","reason":"exists"}')
        print("token received, not shown")

    with_backend(body)
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{test name: "passed"/"failed" and the guard's words}`` for :data:`CASES`."""
    folder = tmp_path_factory.mktemp("guard")
    (folder / "test_cases.py").write_text(textwrap.dedent(CASES))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "tests.leak_guard", "-p", "no:cacheprovider"),
            *("-p", "no:randomly", "-rA", "-q", "--rootdir", str(folder), "-c", "/dev/null"),
            str(folder / "test_cases.py"),
        ],
        cwd=REPO,
        # -c /dev/null drops the project's pythonpath: the repository and the test kit
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "testkit")))},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # each failure's section ("____ name ____" then the guard's words)
    parts = re.split(r"^_{3,} (\S+) _{3,}$", result.stdout, flags=re.M)[1:]
    sections = dict(zip(parts[::2], parts[1::2], strict=True))
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        for word in ("PASSED", "FAILED"):
            if line.startswith(word) and "::" in line:
                name = line.split("::", 1)[1].split()[0]
                found[name] = f"{word.lower()}: {sections.get(name, '')}"
    assert len(found) == 5, result.stdout + result.stderr
    return found


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("test_a_health_report_with_a_sentinel", "a body the backend received"),
        ("test_a_scan_body_with_an_issued_token", "a body the backend received"),
        ("test_printing_a_token_the_backend_issued", "into the output"),
        ("test_printing_a_refresh_token_of_a_grant", "into the output"),
    ],
)
def test_the_guard_fails_a_test_that_let_a_secret_through(
    outcomes: dict[str, str], case: str, says: str
) -> None:
    assert outcomes[case].startswith("failed") and says in outcomes[case], outcomes[case]


def test_the_guard_passes_a_clean_test(outcomes: dict[str, str]) -> None:
    assert outcomes["test_clean"].startswith("passed"), outcomes["test_clean"]
