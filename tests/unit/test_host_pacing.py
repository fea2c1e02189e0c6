"""Per-host login pacing: each host key at its own rate, the global rate shared fairly.

The decisions (:class:`PaceBook`) are checked as plain functions; the limiter that uses
them (:class:`ConnectLimiter` with ``host_rates``) on trio's virtual clock, with the
defaults of a real daemon (20 handshakes at once, a quarter per host, 50 starts/s).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from trio_idle.accounts.providers import PRESETS, host_rates, pace_key
from trio_idle.core.config import ConfigError, Settings, parse_settings
from trio_idle.core.host_pacing import PROVIDER_NAMES, HostRates, PaceBook
from trio_idle.core.limiter import ConnectLimiter

RATE = 50.0
EPS = 1e-9

# -- the pure decisions -------------------------------------------------------------------


def test_host_rates_by_preset_host_port_host_and_generic() -> None:
    rates = HostRates({"gmail": 10.0, "a.example:993": 5.0, "b.example": 7.0}, generic=20.0)
    assert rates.rate_of("gmail") == 10.0
    assert rates.rate_of("yahoo") is None  # a preset without a rate: no own limit
    assert rates.rate_of("a.example:993") == 5.0
    assert rates.rate_of("a.example:143") == 20.0  # another port: another host
    assert rates.rate_of("b.example:143") == 7.0  # a bare host: any port
    assert rates.rate_of("c.example:993") == 20.0
    assert HostRates().rate_of("c.example:993") is None


def drain(
    book: PaceBook, backlog: dict[str, int], until: float = math.inf
) -> list[tuple[float, str]]:
    """Start everything in ``backlog`` (key → count, all waiting from t=0) as the book
    says; ``(time, key)`` of each start."""
    starts: list[tuple[float, str]] = []
    now = 0.0
    waiting = [key for key, n in backlog.items() if n]
    while waiting:
        choice = book.choose(waiting, now)
        assert choice is not None
        key, at = choice
        assert at >= now
        if at > until:
            break
        now = at
        book.started(key, now)
        starts.append((now, key))
        backlog[key] -= 1
        waiting.remove(key)
        if backlog[key]:
            waiting.append(key)  # the key's next task arrives behind the others
    return starts


def gaps(starts: Sequence[tuple[float, str]], key: str | None = None) -> list[float]:
    times = [t for t, k in starts if key is None or k == key]
    return [b - a for a, b in itertools.pairwise(times)]


def test_global_pace_holds_across_many_hosts() -> None:
    book = PaceBook(RATE)
    starts = drain(book, {f"h{i}.example:993": 20 for i in range(30)})
    assert len(starts) == 600
    assert min(gaps(starts)) >= 1 / RATE - EPS
    # and it is the pace, not something slower
    assert starts[-1][0] == pytest.approx(599 / RATE)


def test_a_host_is_never_faster_than_its_own_rate() -> None:
    book = PaceBook(RATE, HostRates({"slow.example:993": 5.0}))
    starts = drain(book, {"slow.example:993": 50, "fast.example:993": 500})
    assert min(gaps(starts, "slow.example:993")) >= 1 / 5.0 - EPS
    assert min(gaps(starts)) >= 1 / RATE - EPS


def test_rate_a_host_cannot_use_goes_to_the_others() -> None:
    # A's own rate is 10/s: B gets the other 40 of the global 50 while both wait
    book = PaceBook(RATE, HostRates({"a.example:993": 10.0}))
    starts = drain(book, {"a.example:993": 5000, "b.example:993": 200}, until=6.0)
    b = [t for t, k in starts if k == "b.example:993"]
    a = [t for t, k in starts if k == "a.example:993"]
    assert len(b) == 200
    assert b[-1] <= 200 / 40.0 + 2 / RATE
    assert len([t for t in a if t <= b[-1]]) <= b[-1] * 10.0 + 1


def test_hosts_waiting_share_the_global_pace_round_robin() -> None:
    book = PaceBook(RATE)
    starts = drain(book, {"a:1": 5000, "b:1": 10, "c:1": 10}, until=1.0)
    first_30 = [k for _, k in starts[:30]]
    # a, b, c take turns: a backlog of 5000 gets one start in three, not all of them
    assert first_30.count("b:1") == 10
    assert first_30.count("c:1") == 10


def test_a_quiet_host_is_forgotten_and_starts_at_once() -> None:
    book = PaceBook(RATE, HostRates(generic=1.0), forget_after=60.0)
    for i in range(6000):  # 120 s of starts, each of another host
        book.started(f"h{i}.example:993", i / RATE)
    assert book.keys_tracked < 6000  # hosts quiet for a minute were dropped on the way
    assert book.host_ready_at("h0.example:993") == -math.inf
    # a host's own-rate time is kept while it still matters
    assert book.host_ready_at("h5999.example:993") == pytest.approx(5999 / RATE + 1.0)


def test_rejects_a_rate_of_zero() -> None:
    with pytest.raises(ValueError, match="global_rate"):
        PaceBook(0.0)


# -- the host key -------------------------------------------------------------------------


def test_pace_key_is_the_preset_else_host_and_port() -> None:
    assert pace_key("gmail", "imap.gmail.com", 993) == "gmail"
    assert pace_key("gmail", "imap.googlemail.com", 993) == "gmail"
    assert pace_key(None, "Mail.Example.COM.", 993) == "mail.example.com:993"
    assert pace_key(None, "127.0.0.1", 1143) != pace_key(None, "127.0.0.1", 1144)
    assert pace_key("generic", "127.0.0.1", 1143) == "127.0.0.1:1143"


def test_provider_names_in_config_are_the_presets() -> None:
    assert tuple(p.name for p in PRESETS) == PROVIDER_NAMES


# -- the settings -------------------------------------------------------------------------

BASE_ENV = {
    "ADMIN_SECRET": "s" * 32,
    "ENCRYPTION_KEY": "k" * 32,
    "DATABASE_URL": "postgresql://u:p@127.0.0.1/db",
}


def test_host_rates_setting() -> None:
    limits = parse_settings(
        {
            **BASE_ENV,
            "TRIO_IDLE_HOST_CONNECT_RATES": " GMAIL=10, imap.example.com.:993=2.5 ,generic=20,",
        }
    ).limits
    assert limits.host_pacing is True
    rates = host_rates(limits)
    assert rates.rate_of("gmail") == 10.0
    assert rates.rate_of("imap.example.com:993") == 2.5
    assert rates.rate_of("other.example:993") == 20.0
    assert rates.rate_of("yahoo") is None  # Yahoo publishes none
    assert Settings().limits.host_connect_rates == ()
    assert host_rates(Settings().limits) == HostRates()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gmial=10", "unknown provider 'gmial'"),
        ("gmail", "expected NAME=RATE"),
        ("gmail=0", "gmail: expected a positive rate per second, got '0'"),
        ("gmail=fast", "gmail: expected a positive rate per second, got 'fast'"),
        ("gmail=nan", "expected a positive rate"),
        ("gmail=1,gmail=2", "'gmail' is named twice"),
        ("a.example:70000=1", "port out of range"),
        ("=5", "expected NAME=RATE"),
        ("a.example:imap=5", "numeric port"),
    ],
)
def test_bad_host_rates_are_one_line_naming_the_variable(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({**BASE_ENV, "TRIO_IDLE_HOST_CONNECT_RATES": value})
    line = str(caught.value)
    assert line.startswith("TRIO_IDLE_HOST_CONNECT_RATES: ")
    assert message in line
    assert "\n" not in line


def test_host_pacing_can_be_switched_off() -> None:
    limits = parse_settings({**BASE_ENV, "TRIO_IDLE_HOST_PACING": "false"}).limits
    assert limits.host_pacing is False
    assert ConnectLimiter.from_settings(limits, host_rates(limits)).host_pacer is None
    assert ConnectLimiter.from_settings(Settings().limits).host_pacer is not None


# -- the limiter on virtual time ----------------------------------------------------------


def daemon_limiter(rates: HostRates | None) -> ConnectLimiter:
    """The limiter of a daemon with the default settings (``None``: host pacing off)."""
    return ConnectLimiter(concurrency=20, rate=RATE, host_share=0.25, host_rates=rates)


async def logins(
    limiter: ConnectLimiter, backlog: dict[str, int], stop_after: str, hold: float = 0.005
) -> list[tuple[float, str]]:
    """Every task of ``backlog`` (key → count) asks for a slot at once, the big backlog
    first; each holds it ``hold`` s (handshake + LOGIN). Returns ``(start time, key)``
    until every task of ``stop_after`` has started; the rest are then cancelled."""
    starts: list[tuple[float, str]] = []
    left = backlog[stop_after]
    done = trio.Event()

    async def login(key: str) -> None:
        nonlocal left
        async with limiter.slot(key):
            starts.append((trio.current_time(), key))
            if key == stop_after:
                left -= 1
                if left == 0:
                    done.set()
            await trio.sleep(hold)

    async with trio.open_nursery() as nursery:
        for key, count in backlog.items():
            for _ in range(count):
                nursery.start_soon(login, key)
            await trio.testing.wait_all_tasks_blocked()  # the big backlog queues first
        await done.wait()
        nursery.cancel_scope.cancel()
    assert limiter.in_progress == 0
    return starts


async def test_a_backlog_of_5000_does_not_delay_another_host_beyond_its_own_pace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the outage host's provider takes 10 logins/s, the other one 20/s
    rates = HostRates({"outage.example:993": 10.0, "other.example:993": 20.0})
    limiter = daemon_limiter(rates)
    t0 = trio.current_time()
    starts = await logins(
        limiter, {"outage.example:993": 5000, "other.example:993": 10}, "other.example:993"
    )
    other = [t - t0 for t, k in starts if k == "other.example:993"]
    outage = [t - t0 for t, k in starts if k == "outage.example:993"]
    # the other host's 10 logins come at their own pace (one per 1/20 s), as if alone,
    # not behind 5000 others and not at half the global pace: done within 9/20 s + one
    # global interval
    assert len(other) == 10
    assert other[-1] <= 9 / 20.0 + 1 / RATE + EPS
    # and neither host is ever faster than its provider takes
    assert min(gaps([(t, "") for t in other])) >= 1 / 20.0 - EPS
    assert min(gaps([(t, "") for t in outage])) >= 1 / 10.0 - EPS
    assert min(gaps(starts)) >= 1 / RATE - EPS


async def test_the_pace_one_host_cannot_use_goes_to_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the outage host takes 10/s: the other host, with no own limit, gets the other 40
    limiter = daemon_limiter(HostRates({"outage.example:993": 10.0}))
    t0 = trio.current_time()
    starts = await logins(
        limiter, {"outage.example:993": 5000, "other.example:993": 200}, "other.example:993"
    )
    other = [t - t0 for t, k in starts if k == "other.example:993"]
    outage = [k for _, k in starts if k == "outage.example:993"]
    assert other[-1] <= 200 / 40.0 + 2 / RATE  # 5 s, not 200 / 25 = 8 s of half the pace
    assert len(outage) <= other[-1] * 10.0 + 1
    assert min(gaps(starts)) >= 1 / RATE - EPS


async def test_hosts_without_own_rates_share_the_global_pace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = daemon_limiter(HostRates())
    starts = await logins(limiter, {"a:993": 5000, "b:993": 20, "c:993": 20}, "c:993")
    keys = [k for _, k in starts]
    assert keys.count("b:993") == 20
    # c's 20 logins took at most its third of the global pace (plus the turn it arrived in)
    assert len(keys) <= 3 * 20 + 3
    assert min(gaps(starts)) >= 1 / RATE - EPS


async def test_concurrency_still_bounds_slow_handshakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = daemon_limiter(HostRates())
    inside = most = 0

    async def login(key: str) -> None:
        nonlocal inside, most
        async with limiter.slot(key):
            inside += 1
            most = max(most, inside)
            assert limiter.host_in_progress(key) <= limiter.per_host
            await trio.sleep(2.0)  # a slow handshake
            inside -= 1

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(login, f"h{i % 8}.example:993")
    assert most == 20
    assert limiter.in_progress == 0
    pacer = limiter.host_pacer
    assert pacer is not None and pacer.keys_waiting == 0


async def test_a_host_held_back_by_its_rate_holds_no_global_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = daemon_limiter(HostRates({"slow.example:993": 0.1}))  # one per 10 s
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(lambda: logins_one(limiter, "slow.example:993"))
        await trio.sleep(1.0)
        # the first one started and finished; the next waits for its own start time,
        # outside the global slots
        assert limiter.in_progress == 0
        nursery.cancel_scope.cancel()
    pacer = limiter.host_pacer
    assert pacer is not None and pacer.keys_waiting == 0
    assert limiter.hosts_tracked == 0


async def logins_one(limiter: ConnectLimiter, key: str) -> None:
    async with limiter.slot(key):
        await trio.sleep(0.001)


async def test_cancelling_waiters_gives_everything_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = daemon_limiter(HostRates({"a:1": 1.0}))
    with trio.move_on_after(2.5):
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(logins_one, limiter, f"{'ab'[i % 2]}:1")
    assert limiter.in_progress == 0
    assert limiter.hosts_tracked == 0
    pacer = limiter.host_pacer
    assert pacer is not None and pacer.keys_waiting == 0
    # and the next connect of a fresh host goes at once (nothing left reserved)
    t0 = trio.current_time()
    await logins_one(limiter, "c:1")
    assert trio.current_time() - t0 < 0.01
