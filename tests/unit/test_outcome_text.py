"""One connection's secrets and the one way its outcomes become text (pure)."""

from __future__ import annotations

from tests.fixtures import mail_connection
from trio_idle.accounts.connections import AUTH_OAUTH2, AUTH_PASSWORD, MailConnection
from trio_idle.accounts.credentials import TOKEN_REVOKED, TokenUnavailable
from trio_idle.accounts.outcome_text import ConnectionSecrets, weak_password_ids
from trio_idle.accounts.providers import GENERIC_PRESET
from trio_idle.core.errors import ConnectionLost, ImapAuthError
from trio_idle.core.scrub import MASK
from trio_idle.mailbox.account_health import classify, explain

PASSWORD = "S3ntinel-pw-outcome"
REFRESH = "S3ntinel-rt-outcome-1"
FIRST = "S3ntinel-at-outcome-first"
SECOND = "S3ntinel-at-outcome-second"
THIRD = "S3ntinel-at-outcome-third"


def conn(
    password: str = PASSWORD, *, auth: str = AUTH_PASSWORD, refresh_token: str | None = None
) -> MailConnection:
    return mail_connection(
        user_id=None,
        email="a@x.test",
        port=143,
        password=password,
        auth=auth,
        refresh_token=refresh_token,
    )


def test_password_refresh_token_and_the_current_and_previous_access_token_are_masked() -> None:
    secrets = ConnectionSecrets.of(conn(refresh_token=REFRESH, auth=AUTH_OAUTH2))
    text = f"{PASSWORD} {REFRESH} {FIRST} {SECOND}"
    assert secrets.scrub(text) == f"{MASK} {MASK} {FIRST} {SECOND}"
    secrets.use_token(FIRST)
    secrets.use_token(FIRST)  # the same token again keeps the previous one
    assert FIRST not in secrets.scrub(text)
    secrets.use_token(SECOND)  # refused, replaced: a server may still quote the first
    assert secrets.scrub(text) == " ".join([MASK] * 4)
    secrets.use_token(THIRD)
    assert secrets.scrub(f"{SECOND} {THIRD}") == f"{MASK} {MASK}"


def test_a_failure_is_text_scrubbed_with_the_whole_set() -> None:
    secrets = ConnectionSecrets.of(conn())
    secrets.use_token(FIRST)
    lost = secrets.failure(ConnectionLost(f"server said 'BYE token {FIRST} expired'"))
    assert lost.text == f"server said 'BYE token {MASK} expired'"
    refused = secrets.failure(
        ImapAuthError(f"login rejected: {PASSWORD}", server_text=f"NO {PASSWORD} {FIRST}")
    )
    assert refused.text == f"login rejected: {MASK}"
    assert refused.words == refused.server_text == f"NO {MASK} {MASK}"
    assert lost.words == lost.text and FIRST not in repr(lost)


def test_the_health_message_is_the_failure_text_never_the_exception_text() -> None:
    # an exception whose own text holds the token: only the Failure's text is shown
    error = ConnectionLost(f"BYE {FIRST}")
    secrets = ConnectionSecrets.of(conn())
    secrets.use_token(FIRST)
    health = classify(secrets.failure(error), GENERIC_PRESET, oauth=True)
    assert health is not None and health.message == f"BYE {MASK}"
    revoked = TokenUnavailable(TOKEN_REVOKED, f"grant of {REFRESH} revoked")
    masked = ConnectionSecrets.of(conn(refresh_token=REFRESH)).failure(revoked)
    health = classify(masked, GENERIC_PRESET, oauth=True)
    assert health is not None and health.message == f"grant of {MASK} revoked"
    told = explain(secrets.failure(ImapAuthError(f"NO {FIRST}")), GENERIC_PRESET, oauth=True)
    assert FIRST not in told and told.startswith(f"NO {MASK} — auth_failed/token_invalid")


def test_short_passwords_are_flagged_but_oauth2_rows_are_not() -> None:
    rows = [
        conn("WRONG"),
        conn("long-enough-password"),
        conn("", auth=AUTH_OAUTH2),
    ]
    assert weak_password_ids(rows) == ["c1"]
    assert weak_password_ids([conn("12345678")]) == []
