"""`orchestrator events` logic (orchestrator/flows/events.py) against a fake host: every message names the
domain, a domain without VFIO device is nothing to do (exit 6), and the hints paste into a shell."""

from __future__ import annotations

import shlex
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from orchestrator.commands.program import main
from orchestrator.core.errors import BadInput, ExitCode, NothingToDo, OrchestratorError
from orchestrator.flows import events

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "domxml"
URI = "qemu+unix:///system?socket=/var/lib/lab/sock"


class FakeDom:
    def __init__(self, name: str, persistent: bool = True) -> None:
        self._name = name
        self.persistent = persistent

    def name(self) -> str:
        return self._name

    def state(self) -> str:
        return "shut off"


class FakeHost:
    """What events.change needs of virt.Host."""

    uri = URI

    def __init__(self, xml: str, name: str = "vm1", *, persistent: bool = True, refuse: bool = False) -> None:
        self.defined = xml
        self.dom = FakeDom(name, persistent)
        self.refuse = refuse
        self.libvirt_version = 11_003_000

    def domain(self, name: str) -> FakeDom:
        if name != self.dom.name():
            raise BadInput(f"no domain {name!r} on {self.uri}")
        return self.dom

    def is_persistent(self, dom: FakeDom) -> bool:
        return dom.persistent

    def xml(self, dom: FakeDom, **_flags: Any) -> str:
        return self.defined

    def versions(self) -> tuple[int, int]:
        return self.libvirt_version, 10_000_000

    def define(self, xml: str) -> FakeDom:
        if self.refuse:
            raise BadInput("libvirt refused the domain definition: unsupported configuration", "fix the XML")
        self.defined = xml
        return self.dom


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def change(host: FakeHost, **kwargs: Any) -> events.ChangeReport:
    options: dict[str, Any] = {"enable": True, "mode": None, "dry_run": False, **kwargs}
    return events.change(host, "vm1", **options)  # type: ignore[arg-type]


def test_enable_on_a_domain_without_vfio_device_is_nothing_to_do_naming_it() -> None:
    host = FakeHost(fixture("no_vfio_usb.xml"))
    for dry_run in (False, True):
        with pytest.raises(NothingToDo) as caught:
            change(host, dry_run=dry_run)
        error = caught.value
        assert error.code == ExitCode.NOTHING_TO_DO
        assert error.message == "vm1 has no VFIO device"
        assert "VFIO PCI or mdev hostdevs" in error.hint and "vfio-pci" in error.hint


def test_every_change_message_names_the_domain() -> None:
    host = FakeHost(fixture("managed_pci.xml"))
    dry = change(host, dry_run=True)
    assert dry.changed and "vm1" in dry.message
    done = change(host)
    assert done.changed and "vm1" in done.message
    again = change(host)
    assert not again.changed and "vm1" in again.message
    off = change(host, enable=False)
    assert off.changed and "vm1" in off.message


def test_xml_conflicts_name_the_domain_and_a_pasteable_virsh_edit() -> None:
    host = FakeHost(fixture("conflict_global_off.xml"))
    with pytest.raises(BadInput) as caught:
        change(host)
    line = caught.value.line()
    assert line.startswith("vm1: ")
    assert f"(virsh -c '{URI}' edit vm1)" in line


def test_libvirt_refusing_the_definition_names_the_domain() -> None:
    host = FakeHost(fixture("managed_pci.xml"), refuse=True)
    with pytest.raises(BadInput) as caught:
        change(host)
    assert caught.value.message.startswith("vm1: libvirt refused the domain definition")


def test_old_libvirt_override_hint_is_a_whole_command() -> None:
    host = FakeHost(fixture("managed_pci.xml"))
    host.libvirt_version = 8_001_000
    with pytest.raises(BadInput) as caught:
        change(host, mode="override")
    error = caught.value
    assert error.message.startswith("vm1: --mode override needs libvirt >= 8.2.0")
    command = error.hint.removeprefix("use: ")
    assert shlex.split(command) == ["orchestrator", "events", "enable", "vm1", "--mode", "global", "-c", URI]


def test_a_transient_domain_hint_pastes() -> None:
    host = FakeHost(fixture("managed_pci.xml"), persistent=False)
    with pytest.raises(BadInput) as caught:
        change(host)
    hint = caught.value.hint
    assert f"virsh -c '{URI}' dumpxml vm1 > vm.xml" in hint
    assert f"virsh -c '{URI}' define vm.xml" in hint


def test_the_cli_prints_nothing_to_do_as_a_notice(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    host = FakeHost(fixture("no_vfio_usb.xml"))

    class Opened:
        @staticmethod
        def open(uri: str) -> Any:
            assert uri == URI
            return _Context(host)

    # The CLI imports orchestrator.edges.virt when the command runs; a stand-in module keeps libvirt out.
    virt = types.ModuleType("orchestrator.edges.virt")
    virt.Host = Opened  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orchestrator.edges.virt", virt)
    with pytest.raises(SystemExit) as exc:
        main(["events", "enable", "vm1", "-c", URI])
    assert exc.value.code == 6
    err = capsys.readouterr().err
    assert err.startswith("orchestrator: nothing to do: vm1 has no VFIO device; only VFIO PCI")
    assert len(err.splitlines()) == 1


class _Context:
    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def __enter__(self) -> FakeHost:
        return self.host

    def __exit__(self, *exc: object) -> None:
        return None


def test_enable_never_raises_a_bare_orchestrator_error_for_a_plain_domain() -> None:
    host = FakeHost(fixture("no_vfio_usb.xml"))
    with pytest.raises(OrchestratorError) as caught:
        change(host, mode="global")
    assert isinstance(caught.value, NothingToDo)
