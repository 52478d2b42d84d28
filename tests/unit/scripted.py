"""A scripted libvirt for unit tests of the migration: a fake clock, fake hosts, a fake QEMU, fake hooks.

This fake stands in for libvirt and QEMU because a unit test has neither (the lab tests prove the same
paths on real daemons). It implements exactly the narrow interface a migration uses
(`orchestrator.core.hypervisor.Hypervisor` and `Guest`) and the hook runner's `start`/`run`, and runs the
whole migration on ONE thread, deterministically:

- `FakeClock.wait()` is where time passes: it runs the next scheduled item (a QEMU event, a hook's end,
  the job's end) or jumps to the wait's timeout. Items call into the migration exactly as libvirt's
  event thread, a hook's waiter thread or the job's thread would.
- `FakeQemu` models one live migration as QEMU does it: memory passes, a downtime limit that decides
  when it switches over (so the gate can be tested), each device's VFIO sequence per hw/vfio/migration.c
  (the device stops answering its peers when its P2P transition starts), failure and cancel paths. Or
  it plays a raw `script` of events for the paths a model would never produce (duplicates, odd orders).
- `FakeRunner` records every hook run with its fake start and end, so tests check the invariant from
  the runner's own record.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.core.errors import MigrationError, OrchestratorError
from orchestrator.core.hooks import Hook, HookResult, Trigger
from orchestrator.core.hypervisor import (
    GONE,
    PAUSED,
    RUNNING,
    Guest,
    Hypervisor,
    JobEnded,
    JobStats,
    MigrateRequest,
    MonitorCallback,
)

EPOCH = 1_700_000_000.0


class FakeClock:
    """Fake time: `wait` runs the next due item, or jumps to the timeout."""

    def __init__(self) -> None:
        self.now = 0.0  # monotonic seconds
        self._items: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return EPOCH + self.now

    def monotonic(self) -> float:
        return self.now

    def at(self, when: float, item: Callable[[], None]) -> None:
        """Run `item` at monotonic time `when` (or now, if that passed)."""
        heapq.heappush(self._items, (max(when, self.now), next(self._seq), item))

    def after(self, delay: float, item: Callable[[], None]) -> None:
        self.at(self.now + delay, item)

    def wait(self, condition: threading.Condition, timeout: float) -> None:
        deadline = self.now + max(timeout, 0.0)
        if self._items and self._items[0][0] <= deadline:
            when, _, item = heapq.heappop(self._items)
            self.now = max(self.now, when)
            item()
        else:
            self.now = deadline

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass, running every item due in them (a blocking call's duration)."""
        deadline = self.now + seconds
        while self._items and self._items[0][0] <= deadline:
            when, _, item = heapq.heappop(self._items)
            self.now = max(self.now, when)
            item()
        self.now = deadline

    def run_all(self, limit: float = 3600.0) -> None:
        """Run everything still scheduled (up to `limit` seconds from now)."""
        self.advance(limit)


# --- hosts and domains ---------------------------------------------------------------------------


class FakeSubscription:
    def __init__(
        self, host: FakeHost, entry: tuple[MonitorCallback, frozenset[str] | None, str | None]
    ) -> None:
        self.host, self.entry = host, entry

    def cancel(self) -> None:
        if self.entry in self.host.subscribers:
            self.host.subscribers.remove(self.entry)


class FakeGuest:
    """A domain on a fake host."""

    def __init__(self, host: FakeHost, name: str, xml: str, state: str = RUNNING) -> None:
        self.host, self._name, self._xml, self._state = host, name, xml, state
        self.downtime_ms = 300  # QEMU's default
        self.downtime_log: list[tuple[float, int]] = []  # (monotonic time, limit) as set
        self.qemu: FakeQemu | None = None  # the running migration job, on the source

    def name(self) -> str:
        return self._name

    def uuid(self) -> str:
        return "00000000-0000-4000-8000-00000000abcd"

    def state(self) -> str:
        return self._state if self.host.domains.get(self._name) is self else GONE

    def xml(self, *, migratable: bool = False, inactive: bool = False) -> str:
        return self._xml

    def job_stats(self) -> JobStats | None:
        return self.qemu.stats() if self.qemu is not None and self.qemu.active else None

    def completed_job_stats(self) -> JobStats | None:
        return JobStats(active=False, expected_downtime_ms=42) if self._state == RUNNING else None

    def abort_job(self) -> bool:
        if self.qemu is None or not self.qemu.active:
            return False
        return self.qemu.cancel()

    def set_max_downtime(self, ms: int) -> None:
        self.downtime_ms = ms
        self.downtime_log.append((self.host.clock.now, ms))

    def max_downtime(self) -> int | None:
        return self.downtime_ms


class FakeHost:
    """One host: its domains and its monitor-event subscribers."""

    def __init__(self, uri: str, clock: FakeClock) -> None:
        self.uri = uri
        self.clock = clock
        self.domains: dict[str, FakeGuest] = {}
        self.subscribers: list[tuple[MonitorCallback, frozenset[str] | None, str | None]] = []
        self.migrations: list[FakeQemu] = []
        self.unreachable = False

    def add(self, name: str, xml: str, state: str = RUNNING) -> FakeGuest:
        guest = self.domains[name] = FakeGuest(self, name, xml, state)
        return guest

    def find_domain(self, name: str) -> Guest | None:
        if self.unreachable:
            raise OrchestratorError(f"cannot reach {self.uri}")
        return self.domains.get(name)

    def subscribe_monitor_events(
        self,
        callback: MonitorCallback,
        *,
        events: Sequence[str] | None = None,
        domain: str | None = None,
        dom: Guest | None = None,
    ) -> FakeSubscription:
        entry = (callback, frozenset(events) if events else None, dom.name() if dom is not None else domain)
        self.subscribers.append(entry)
        return FakeSubscription(self, entry)

    def emit(self, domain: str, name: str, data: Mapping[str, Any] | None = None) -> None:
        """A QEMU monitor event of `domain` on this host, as libvirt's event thread delivers it."""
        t = self.clock.time()
        seconds, micros = int(t), round((t - int(t)) * 1_000_000)
        for callback, events, only in list(self.subscribers):
            if (events is None or name in events) and (only is None or only == domain):
                callback(domain, name, seconds, micros, dict(data) if data is not None else None)

    def start_migration(
        self, dom: Guest, request: MigrateRequest, destination: Hypervisor, on_end: JobEnded
    ) -> None:
        assert isinstance(dom, FakeGuest) and isinstance(destination, FakeHost)
        model = self.model_for(dom)
        qemu = FakeQemu(self, destination, dom, request, on_end, model)
        self.migrations.append(qemu)
        dom.qemu = qemu
        qemu.start()

    # Tests set this: how the next migration behaves.
    model: Model | None = None

    def model_for(self, dom: FakeGuest) -> Model:
        return self.model or Model()


# --- the fake QEMU -------------------------------------------------------------------------------


@dataclass
class FakeDevice:
    """One VFIO device in the fake QEMU (QEMU 11.0 behaviour unless `prepare` is False)."""

    device_id: str
    precopy: bool = True
    p2p: bool = True
    prepare: bool = True  # QEMU >= 11.0: emits pre-copy-p2p-prepare
    emits: bool = True
    transition_s: float = 0.3
    quiet_at: float | None = None  # monotonic time its P2P transition started (it stops answering)


@dataclass
class Model:
    """How one fake migration behaves.

    Memory: a pass takes `pass_s`; after the first pass QEMU's expected downtime is `dirty_ms` (what the
    guest dirties per pass over the bandwidth); QEMU switches over at a pass boundary when its downtime
    limit is at least that (an idle guest, `dirty_ms=0`, switches over even at the gate's 1 ms).
    `script`: instead of the model, a list of (delay after the previous step, step) where a step is
    ("vfio", role, device, state), ("qemu", role, name, data), ("end", error or None): for the paths a
    model never produces (duplicates, odd orders, events that never come).
    """

    devices: list[FakeDevice] = field(default_factory=lambda: [FakeDevice("nic0")])
    pass_s: float = 0.5
    dirty_ms: int = 20
    fail_transition: str | None = None  # the P2P transition of the first device fails into this state
    fail_after_s: float | None = None  # the job fails on its own after this long (pre-copy)
    destination_dies: bool = False  # the incoming QEMU dies at switchover: the job fails
    complete_s: float = 0.05  # from the last device's stop-copy to the job's end
    never_resumes: set[str] = field(default_factory=set)  # devices whose destination 'running' never comes
    script: list[tuple[float, tuple[Any, ...]]] | None = None
    ignores_cancel: bool = False  # a cancel lands only when the script ends the job (QEMU mid-switchover)
    job_error: str = "migration to dst failed: operation failed: job 'migration out' failed"


class FakeQemu:
    """One migration job: source and destination QEMU, driven by the fake clock."""

    def __init__(
        self,
        source: FakeHost,
        destination: FakeHost,
        dom: FakeGuest,
        request: MigrateRequest,
        on_end: JobEnded,
        model: Model,
    ) -> None:
        self.source, self.destination, self.dom = source, destination, dom
        self.request, self.on_end, self.model = request, on_end, model
        self.clock = source.clock
        self.active = False
        self.iteration = 0
        self.started = 0.0
        self.switched_over_at: float | None = None
        self.cancelled = False
        self.ended = False
        self.incoming: FakeGuest | None = None

    @property
    def name(self) -> str:
        return self.dom.name()

    def start(self) -> None:
        self.active = True
        self.started = self.clock.now
        if self.model.script is not None:
            self._play_script()
            return
        self.source.emit(self.name, "MIGRATION", {"status": "setup"})
        for device in self.model.devices:
            if device.precopy:
                self._vfio(self.source, device, "pre-copy")
        self.source.emit(self.name, "MIGRATION", {"status": "active"})
        self.incoming = self.destination.add(self.name, self.dom.xml(), PAUSED)
        self.clock.after(0.02, self._incoming_active)
        self.iteration = 1
        self.clock.after(self.model.pass_s, self._pass_done)
        if self.model.fail_after_s is not None:
            self.clock.after(self.model.fail_after_s, lambda: self._fail(self.model.job_error))

    def _incoming_active(self) -> None:
        if self.ended:
            return
        self.destination.emit(self.name, "MIGRATION", {"status": "active"})
        for device in self.model.devices:
            self._vfio(self.destination, device, "resuming")

    def _vfio(self, host: FakeHost, device: FakeDevice, state: str) -> None:
        if device.emits:
            data = {"device-id": device.device_id, "qom-path": f"/machine/peripheral/{device.device_id}"}
            host.emit(self.name, "VFIO_MIGRATION", {**data, "device-state": state})

    def stats(self) -> JobStats:
        elapsed = self.clock.now - self.started
        expected = (
            self.dom.downtime_ms if self.iteration < 3 else self.model.dirty_ms
        )  # QEMU echoes the limit
        return JobStats(
            elapsed_ms=int(elapsed * 1000),
            memory_total=64 << 20,
            memory_processed=min(64 << 20, int(elapsed / self.model.pass_s * (64 << 20))),
            memory_remaining=max(0, (64 << 20) - int(elapsed / self.model.pass_s * (64 << 20))),
            bandwidth_bps=128 << 20,
            iteration=self.iteration,
            expected_downtime_ms=expected,
        )

    def _pass_done(self) -> None:
        if self.ended or self.switched_over_at is not None:
            return
        self.iteration += 1
        limit = self.dom.downtime_ms
        self.source.emit(self.name, "MIGRATION_PASS", {"pass": self.iteration})
        if self.model.dirty_ms == 0 or limit >= self.model.dirty_ms:
            self._switchover()
        else:
            self.clock.after(self.model.pass_s, self._pass_done)

    def _switchover(self) -> None:
        """vCPUs stop; each device's P2P transition in turn (QEMU runs the vm-state handlers one by one)."""
        self.switched_over_at = self.clock.now
        self.source.emit(self.name, "MIGRATION", {"status": "device"})
        steps: list[tuple[float, Callable[[], None]]] = []
        delay = 0.0
        for index, device in enumerate(self.model.devices):
            if not device.p2p:
                continue
            target = "pre-copy-p2p" if device.precopy else "running-p2p"
            if device.precopy and device.prepare:
                steps.append((delay, lambda d=device: self._vfio(self.source, d, "pre-copy-p2p-prepare")))
            steps.append((delay, lambda d=device: setattr(d, "quiet_at", self.clock.now)))
            delay += device.transition_s
            if index == 0 and self.model.fail_transition:
                fallback = self.model.fail_transition
                steps.append((delay, lambda d=device, s=fallback: self._vfio(self.source, d, s)))
                steps.append((delay, lambda: self._fail("migration failed: device transition failed")))
                break
            steps.append((delay, lambda d=device, t=target: self._vfio(self.source, d, t)))
        else:
            for device in self.model.devices:
                steps.append((delay, lambda d=device: self._quiet(d)))
                steps.append((delay, lambda d=device: self._vfio(self.source, d, "stop-copy")))
            steps.append((delay, lambda: self.source.emit(self.name, "STOP")))
            if self.model.destination_dies:
                steps.append((delay + 0.01, lambda: self._fail("migration failed: destination QEMU died")))
            else:
                steps.append((delay + self.model.complete_s, self._complete))
        base = self.clock.now
        for offset, step in steps:
            if offset == 0:
                step()  # QEMU announces the first transition the moment it decides to switch over
            else:
                self.clock.at(base + offset, step)

    def _quiet(self, device: FakeDevice) -> None:
        if device.quiet_at is None:
            device.quiet_at = self.clock.now

    def _complete(self) -> None:
        if self.ended:
            return
        self.source.emit(self.name, "MIGRATION", {"status": "completed"})
        for device in self.model.devices:
            self._vfio(self.source, device, "stop")
        self.source.emit(self.name, "SHUTDOWN")
        # The source domain goes away (undefined after success); the destination's runs.
        self.source.domains.pop(self.name, None)
        assert self.incoming is not None
        self.incoming._state = RUNNING
        self.destination.emit(self.name, "MIGRATION", {"status": "completed"})
        for device in self.model.devices:
            if device.p2p:
                self._vfio(self.destination, device, "running-p2p")
        self.destination.emit(self.name, "RESUME")
        for device in self.model.devices:
            if device.device_id not in self.model.never_resumes:
                self._vfio(self.destination, device, "running")
        self._end(None)

    def cancel(self) -> bool:
        """abortJob: QEMU cancels unless the switchover already completed."""
        if self.ended:
            return False
        self.cancelled = True
        if not self.model.ignores_cancel:
            self.clock.after(
                0.01, lambda: self._fail("operation aborted: migration out job: canceled by client")
            )
        return True

    def _fail(self, error: str) -> None:
        if self.ended:
            return
        self.source.emit(self.name, "MIGRATION", {"status": "cancelled" if self.cancelled else "failed"})
        for device in self.model.devices:
            self._vfio(self.source, device, "running")
        if self.switched_over_at is not None:
            self.source.emit(self.name, "RESUME")
        if self.incoming is not None:
            self.destination.domains.pop(self.name, None)
        self._end(MigrationError(error))

    def _end(self, error: OrchestratorError | None) -> None:
        self.ended = True
        self.active = False
        self.on_end(error)

    def _play_script(self) -> None:
        assert self.model.script is not None
        when = self.clock.now
        for delay, step in self.model.script:
            when += delay
            self.clock.at(when, lambda step=step: self._script_step(step))

    def _script_step(self, step: tuple[Any, ...]) -> None:
        kind = step[0]
        if kind == "vfio":
            _, role, device, state = step
            host = self.source if role == "src" else self.destination
            data = {"device-id": device, "qom-path": f"/machine/peripheral/{device}", "device-state": state}
            host.emit(self.name, "VFIO_MIGRATION", data)
        elif kind == "qemu":
            _, role, name, data = step
            (self.source if role == "src" else self.destination).emit(self.name, name, data)
        elif kind == "end" and not self.ended:
            error = step[1]
            if error is None:
                self.source.domains.pop(self.name, None)
                self.destination.add(self.name, self.dom.xml(), RUNNING)
                self._end(None)
            else:
                self._end(MigrationError(error))


# --- hooks ---------------------------------------------------------------------------------------


END = ("started", "ended", "duration_ms", "exit_code", "timed_out", "error", "output_tail")


@dataclass
class Behaviour:
    """How a fake hook run goes: how long it takes, and how it ends."""

    duration_s: float = 0.01
    error: str | None = None  # None: exits 0
    timed_out: bool = False


@dataclass
class HookRun:
    """One hook run as the fake runner saw it (fake monotonic times)."""

    trigger: Trigger
    device_id: str | None
    label: str
    values: dict[str, str]
    started: float
    ended: float | None = None
    ok: bool | None = None
    pid: int | None = None  # no process: nothing for a journal's `spawned` record to name
    waiter: Callable[[], HookResult] | None = field(default=None, repr=False, compare=False)

    def wait(self) -> HookResult:
        """Let fake time pass until this run ends (a started hook's `wait`)."""
        assert self.waiter is not None, "a run from FakeRunner.start"
        return self.waiter()


class FakeRunner:
    """Starts no process: each hook 'runs' on the fake clock and ends as `behaviours` say. Attached to a
    run log, it writes each hook's start and end there, as the hook supervisor does (a stand-in: the
    supervisor's own behaviour is tested with real processes in test_supervisor.py)."""

    supervisor_pid = None  # no supervisor process

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.log: tuple[str, int] | None = None  # the run log attached: its migration id and fd
        self.logs: list[str] = []  # every run log it was attached to, in order
        self.detached = 0
        self._runs = itertools.count(1)
        self.runs: list[HookRun] = []
        # (trigger, device id or None for any) -> behaviour; missing: 10 ms, success
        self.behaviours: dict[tuple[Trigger, str | None], Behaviour] = {}
        self.on_start: Callable[[HookRun], None] | None = None
        self.armed: list[FakeArmed] = []
        self.arming: Behaviour = Behaviour()  # how arming goes (its error: it never gets ready)

    def attach(self, log: str, fd: int) -> None:
        self.log = (log, fd)
        self.logs.append(log)

    def detach(self) -> None:
        self.log = None
        self.detached += 1

    def _record(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            os.write(self.log[1], (json.dumps(record) + "\n").encode())

    def behaviour(self, trigger: Trigger, device: str | None) -> Behaviour:
        return self.behaviours.get((trigger, device)) or self.behaviours.get((trigger, None)) or Behaviour()

    def _result(self, hook: Hook, run: HookRun, behaviour: Behaviour) -> HookResult:
        result = HookResult(
            hook.label,
            hook.trigger,
            run.device_id,
            list(hook.argv),
            1,
            EPOCH + run.started,
            run.started,
            4242,
        )
        result.ended = EPOCH + self.clock.now
        result.duration_ms = (self.clock.now - run.started) * 1000
        result.timed_out = behaviour.timed_out
        result.error = behaviour.error or ("timed out" if behaviour.timed_out else None)
        result.exit_code = None if behaviour.timed_out else (0 if behaviour.error is None else 1)
        run.ended, run.ok = self.clock.now, result.ok
        return result

    def start(
        self,
        hook: Hook,
        values: Mapping[str, str],
        device_id: str | None = None,
        on_done: Callable[[HookResult], None] | None = None,
        *,
        attempt: int = 1,
        index: int | None = None,
    ) -> HookRun:
        run = HookRun(hook.trigger, device_id, hook.label, dict(values), self.clock.now)
        self.runs.append(run)
        number = str(next(self._runs))
        self._record(
            {
                "k": "hook-start",
                "run": number,
                "hook": index,
                "label": hook.label,
                "trigger": hook.trigger.value,
            }
            | {"device_id": device_id, "argv": list(hook.argv), "attempt": attempt, "pid": None}
            | {"started": EPOCH + run.started, "timeout_ms": hook.timeout_ms, "armed": False}
        )
        if self.on_start is not None:
            self.on_start(run)
        behaviour = self.behaviour(hook.trigger, device_id)

        box: list[HookResult] = []

        def finish() -> None:
            result = self._result(hook, run, behaviour)
            result.run = number
            self._record(
                {"k": "hook-end", "run": number, **{k: v for k, v in result.to_json().items() if k in END}}
            )
            box.append(result)
            if on_done is not None:
                on_done(result)

        def wait() -> HookResult:
            while not box:
                self.clock.advance(max(run.started + behaviour.duration_s - self.clock.now, 0.0))
            return box[0]

        self.clock.after(behaviour.duration_s, finish)
        run.waiter = wait
        return run

    def run(self, hook: Hook, values: Mapping[str, str], device_id: str | None = None) -> HookResult:
        run = HookRun(hook.trigger, device_id, hook.label, dict(values), self.clock.now)
        self.runs.append(run)
        if self.on_start is not None:
            self.on_start(run)
        behaviour = self.behaviour(hook.trigger, device_id)
        self.clock.advance(behaviour.duration_s)
        return self._result(hook, run, behaviour)

    def arm(self, hook: Hook, values: Mapping[str, str]) -> FakeArmed:
        armed = FakeArmed(self, hook, dict(values))
        self.armed.append(armed)
        return armed

    def of(self, trigger: Trigger, device: str | None = None) -> list[HookRun]:
        return [r for r in self.runs if r.trigger is trigger and (device is None or r.device_id == device)]


class FakeArmed:
    """An armed hook on the fake clock: ready after the arming behaviour's duration; each `fire` is a
    run (recorded like a started hook) that ends as the runner's behaviours say."""

    def __init__(self, runner: FakeRunner, hook: Hook, values: dict[str, str]) -> None:
        self.runner, self.hook, self.values = runner, hook, values
        self.lines: list[str] = []  # what the orchestrator wrote to its stdin
        self.closed = False
        self.ready = runner.arming.error is None
        self.pid: int | None = None  # no process

    def wait_ready(self) -> HookResult:
        run = HookRun(self.hook.trigger, None, self.hook.label, self.values, self.runner.clock.now)
        self.runner.clock.advance(self.runner.arming.duration_s)
        return self.runner._result(self.hook, run, self.runner.arming)

    def fire(
        self,
        device_id: str,
        state: str,
        qemu_time: float | None,
        on_done: Callable[[HookResult], None] | None = None,
    ) -> HookRun:
        self.lines.append(
            f"{'drain' if self.hook.trigger is Trigger.DRAIN else 'undrain'} {device_id} {state}"
        )
        behaviour = (
            self.runner.behaviour(self.hook.trigger, device_id)
            if self.ready
            else Behaviour(duration_s=0.0, error="the armed hook cannot act: it never got ready")
        )
        run = HookRun(
            self.hook.trigger,
            device_id,
            self.hook.label,
            {**self.values, "state": state},
            self.runner.clock.now,
        )
        self.runner.runs.append(run)
        if self.runner.on_start is not None:
            self.runner.on_start(run)

        def finish() -> None:
            result = self.runner._result(self.hook, run, behaviour)
            if on_done is not None:
                on_done(result)

        self.runner.clock.after(behaviour.duration_s, finish)
        return run

    def close(self) -> HookResult | None:
        self.closed = True
        return None


def assert_invariant(runner: FakeRunner, drain_hooks: int = 1, undrain_hooks: int = 1) -> None:
    """From the runner's own record: every drained device undrained exactly once (each hook once),
    never an undrain before its drains ended, never an undrain without a drain."""
    devices = {r.device_id for r in runner.runs if r.trigger in (Trigger.DRAIN, Trigger.UNDRAIN)}
    for device in devices:
        drains = runner.of(Trigger.DRAIN, device)
        undrains = runner.of(Trigger.UNDRAIN, device)
        assert len(drains) == drain_hooks, f"{device}: {len(drains)} drain runs, expected {drain_hooks}"
        assert len(undrains) == undrain_hooks, (
            f"{device}: {len(undrains)} undrain runs, expected {undrain_hooks}"
        )
        assert all(r.ended is not None for r in drains + undrains), f"{device}: a hook never ended"
        last_drain_end = max(r.ended for r in drains if r.ended is not None)
        assert all(u.started >= last_drain_end for u in undrains), f"{device}: undrain before its drain ended"
