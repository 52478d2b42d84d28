"""`orchestrator watch` (orchestrator/flows/watch.py) with the host opening faked: unreachable hosts at the
start are reported and retried, a repeated -c is watched once, a --domain found nowhere is a warning,
no reachable host at all is one line and exit 3."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator.commands.program import main
from orchestrator.core.errors import ConnectError, ExitCode
from orchestrator.flows import watch

A = "qemu+ssh://a/system"
B = "qemu+unix:///system?socket=/run/b/libvirt-sock"


class FakeSub:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeHost:
    def __init__(self, uri: str, domains: set[str]) -> None:
        self.uri = uri
        self.domains = domains
        self.closed = False
        self.on_closed: Callable[[str], None] | None = None
        self.callback: watch.MonitorCallback | None = None
        self.filters: dict[str, Any] = {}
        self.sub = FakeSub()

    def on_close(self, callback: Callable[[str], None]) -> None:
        self.on_closed = callback

    def subscribe_monitor_events(
        self, callback: watch.MonitorCallback, *, events: Any = None, domain: str | None = None
    ) -> FakeSub:
        self.callback = callback
        self.filters = {"events": events, "domain": domain}
        return self.sub

    def find_domain(self, name: str) -> object | None:
        return object() if name in self.domains else None

    def close(self) -> None:
        self.closed = True

    def emit(self, domain: str, state: str) -> None:
        assert self.callback is not None
        self.callback(
            domain, "VFIO_MIGRATION", 1_700_000_000, 250_000, {"device-id": "nic0", "device-state": state}
        )

    def drop(self, reason: str = "connection closed") -> None:
        assert self.on_closed is not None
        self.on_closed(reason)


class Network:
    """Which URIs answer; every host opened, in order."""

    def __init__(self, up: set[str], domains: set[str] | None = None) -> None:
        self.up = set(up)
        self.domains = domains or set()
        self.opened: list[FakeHost] = []
        self.attempts: list[str] = []
        self._lock = threading.Lock()

    def open(self, uri: str) -> FakeHost:
        with self._lock:
            self.attempts.append(uri)
            if uri not in self.up:
                raise ConnectError(f"cannot connect to {uri}: Connection refused", "check the URI")
            host = FakeHost(uri, self.domains)
            self.opened.append(host)
            return host

    def host(self, uri: str) -> FakeHost:
        return [h for h in self.opened if h.uri == uri][-1]


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()

    def __call__(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        with self._cond:
            assert self._cond.wait_for(lambda: any(text in line for line in self.lines), timeout), self.lines
            return next(line for line in self.lines if text in line)


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def make(log: Log) -> Iterator[Callable[..., tuple[watch.Watcher, io.StringIO]]]:
    made: list[watch.Watcher] = []

    def build(uris: list[str], net: Network, domain: str | None = None) -> tuple[watch.Watcher, io.StringIO]:
        out = io.StringIO()
        watcher = watch.Watcher(uris, domain, out, log, open_host=net.open, retry_s=0.02)
        made.append(watcher)
        return watcher, out

    yield build
    for watcher in made:
        watcher.close()


def records(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_an_unreachable_host_is_reported_retried_and_watched_once_it_connects(make: Any, log: Log) -> None:
    net = Network(up={A})
    watcher, out = make([A, B], net)
    watcher.start()
    assert (
        log.lines[0]
        == f"orchestrator: warning: cannot connect to {B}: Connection refused; retrying every 0.02 s"
    )
    assert log.lines[-1] == "orchestrator: watching 1 host(s); Ctrl-C to stop"
    assert (watcher.alive, watcher.pending) == ({A}, {B})
    net.host(A).emit("vm1", "pre-copy")

    time.sleep(0.1)
    assert net.attempts.count(B) >= 3, "retried every few seconds (here 0.02 s)"
    assert len(log.lines) == 2, "retries are quiet until the host connects"
    net.up.add(B)
    assert log.wait_for(f"connected to {B}") == f"orchestrator: connected to {B}; watching 2 host(s)"
    assert (watcher.alive, watcher.pending) == ({A, B}, set())
    attempts = net.attempts.count(B)
    time.sleep(0.1)
    assert net.attempts.count(B) == attempts, "no retry once connected"

    net.host(B).emit("vm1", "resuming")
    assert [(r["host"], r["state"]) for r in records(out)] == [(A, "pre-copy"), (B, "resuming")]
    watcher.close()
    assert all(h.closed and h.sub.cancelled for h in net.opened)


def test_a_repeated_uri_is_watched_once(make: Any, log: Log) -> None:
    net = Network(up={A, B})
    watcher, out = make([A, B, A, A], net)
    watcher.start()
    assert net.attempts == [A, B]
    assert log.lines == ["orchestrator: watching 2 host(s); Ctrl-C to stop"]
    net.host(A).emit("vm1", "pre-copy")
    assert len(records(out)) == 1, "one line per event, not one per -c"


def test_a_domain_found_nowhere_is_a_warning_once_and_still_watched(make: Any, log: Log) -> None:
    net = Network(up={A, B})
    watcher, out = make([A, B], net, domain="vm9")
    watcher.start()
    warnings = [line for line in log.lines if "warning" in line]
    assert warnings == [
        "orchestrator: warning: domain 'vm9' exists on none of the watched hosts; "
        "watching for it anyway (it may be created or migrated in)"
    ]
    assert net.host(A).filters == {"events": ["VFIO_MIGRATION", "VFIO_MIGRATION_PREPARE"], "domain": "vm9"}
    net.host(B).emit("vm9", "resuming")  # migrated in later
    assert [r["domain"] for r in records(out)] == ["vm9"]


def test_a_domain_found_on_one_host_is_no_warning(make: Any, log: Log) -> None:
    net = Network(up={A, B}, domains={"vm1"})
    make([A, B], net, domain="vm1")[0].start()
    assert not any("warning" in line for line in log.lines)


def test_with_a_host_unreachable_the_domain_warning_says_reachable(make: Any, log: Log) -> None:
    net = Network(up={A})
    make([A, B], net, domain="vm9")[0].start()
    assert any("exists on none of the reachable hosts" in line for line in log.lines)


def test_no_reachable_host_is_one_line_exit_3(log: Log) -> None:
    net = Network(up=set())
    with pytest.raises(ConnectError) as caught:
        watch.run([A, B, A], None, io.StringIO(), log, open_host=net.open, retry_s=0.02)
    error = caught.value
    assert error.code == ExitCode.CONNECT
    assert error.message == (
        f"cannot reach any of the 2 watched hosts: cannot connect to {A}: Connection refused; "
        f"cannot connect to {B}: Connection refused"
    )
    assert "\n" not in error.line()
    assert log.lines == []
    time.sleep(0.05)
    assert net.attempts == [A, B], "nothing retried after giving up"


def test_one_unreachable_host_hint_pastes(log: Log) -> None:
    with pytest.raises(ConnectError) as caught:
        watch.run([B], None, io.StringIO(), log, open_host=Network(up=set()).open)
    assert caught.value.hint == f"check the URI and that libvirtd runs there: virsh -c '{B}' list"


def test_a_host_going_away_is_reported_and_the_last_one_ends_the_watch(make: Any, log: Log) -> None:
    net = Network(up={A, B})
    watcher, _ = make([A, B], net)
    watcher.start()
    net.host(B).drop()
    assert log.lines[-1] == f"orchestrator: host {B} went away (connection closed); still watching 1 host(s)"
    net.host(A).drop("keepalive timeout")
    with pytest.raises(ConnectError, match="every watched host went away"):
        watcher.wait()


def test_a_host_still_being_retried_keeps_the_watch_going(make: Any, log: Log) -> None:
    net = Network(up={A})
    watcher, _ = make([A, B], net)
    watcher.start()
    net.host(A).drop()
    waiter = threading.Thread(target=watcher.wait, daemon=True)
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive(), "B may still come"
    watcher.stop()
    waiter.join(2)
    assert not waiter.is_alive()


def test_a_connect_that_ends_after_close_is_closed_too(log: Log) -> None:
    release = threading.Event()
    net = Network(up={A, B})
    opened_late: list[FakeHost] = []

    def slow_open(uri: str) -> FakeHost:
        if uri == B:
            release.wait(5)
            host = net.open(uri)
            opened_late.append(host)
            return host
        return net.open(uri)

    first = {"done": False}

    def open_host(uri: str) -> FakeHost:
        if uri == B and not first["done"]:
            first["done"] = True
            raise ConnectError(f"cannot connect to {uri}: refused")
        return slow_open(uri)

    watcher = watch.Watcher([A, B], None, io.StringIO(), log, open_host=open_host, retry_s=0.01)
    watcher.start()
    time.sleep(0.05)  # the retry is now inside slow_open
    watcher.close()
    release.set()
    deadline = time.monotonic() + 2
    while not (opened_late and opened_late[0].closed) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert opened_late and opened_late[0].closed and opened_late[0].sub.cancelled
    assert not any("connected to" in line for line in log.lines)


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_watch_with_no_reachable_host(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    net = Network(up=set())
    monkeypatch.setattr(watch, "open_libvirt_host", net.open)
    with pytest.raises(SystemExit) as exc:
        main(["watch", "-c", A, "-c", B])
    assert exc.value.code == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("orchestrator: error: cannot reach any of the 2 watched hosts: ")
    assert len(captured.err.splitlines()) == 1


def test_cli_watch_an_empty_uri_is_bad_input(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["watch", "-c", A, "-c", ""])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "orchestrator: error: the source URI (-c/--connect) is empty; "
        "give a libvirt URI, e.g. -c 'qemu:///system'\n"
    )


def test_cli_watch_defaults_to_libvirt_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(watch, "run", lambda uris, *_a, **_k: seen.append(list(uris)))
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", B)
    main(["watch"])
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "")
    main(["watch"])
    assert seen == [[B], ["qemu:///system"]]
