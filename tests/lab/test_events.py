"""`orchestrator events status|enable|disable` against real libvirt definitions (no hardware needed
to define hostdevs), and a lab guest whose device emits only after enable + a cold boot."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from lab.runner import Run, cli

from orchestrator.core import domxml

HOSTDEV_XML = """<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/>
      </source>
    </hostdev>
    <hostdev mode='subsystem' type='mdev' managed='no' model='vfio-pci'>
      <source>
        <address uuid='c2177883-f1bb-47f0-914d-32a22e3a8804'/>
      </source>
    </hostdev>
    <memballoon model='none'/>
  </devices>
{extra}</domain>
"""


def define(lab: Any, extra: str = "", devices: bool = True) -> str:
    name = f"ev-{uuid.uuid4().hex[:8]}"
    xml = HOSTDEV_XML.format(name=name, extra=extra)
    if not devices:
        start = xml.index("    <hostdev")
        xml = xml[:start] + xml[xml.index("    <memballoon") :]
    lab.conn(0).define(xml)
    return name


def events(*args: str, lab: Any, host: int = 0) -> Run:
    return cli("events", *args, "-c", lab.hosts[host].uri)


def definition(lab: Any, name: str) -> str:
    conn = lab.conn(0)
    return str(conn.xml(conn.domain(name), inactive=True, secure=True))


def test_status_enable_disable_roundtrip_in_both_modes(lab_env: Any) -> None:
    name = define(lab_env)
    original = definition(lab_env, name)
    run = events("status", name, "--json", lab=lab_env)
    assert run.code == 0, run.err
    status = run.doc
    assert {d["host_address"] for d in status["devices"]} == {
        "0000:3b:00.1",
        "c2177883-f1bb-47f0-914d-32a22e3a8804",
    }
    assert all(d["defined_on"] is False and d["running_on"] is None for d in status["devices"])
    assert status["modes"] == ["override", "global"] and status["qemu_knows_event"] is None

    for mode in ("override", "global"):
        run = events("enable", name, "--mode", mode, "--json", lab=lab_env)
        assert run.code == 0, run.err
        assert run.doc["changed"] is True
        after = definition(lab_env, name)
        assert domxml.events_status(after).all_enabled, "libvirt kept the property"
        if mode == "override":
            assert "<qemu:property name='migration-events' type='bool' value='true'/>" in after
            assert "ua-vfio-0000-3b-00-1" in after
        else:
            assert "vfio-pci.migration-events=on" in after
        again = events("enable", name, "--mode", mode, "--json", lab=lab_env)
        assert again.code == 0 and again.doc["changed"] is False, again.err
        off = events("disable", name, "--json", lab=lab_env)
        assert off.code == 0 and off.doc["changed"] is True, off.err
        assert definition(lab_env, name) == original, "disable removed exactly what enable added"
    lab_env.remove(name)


def test_dry_run_prints_a_diff_and_writes_nothing(lab_env: Any) -> None:
    name = define(lab_env)
    original = definition(lab_env, name)
    run = events("enable", name, "--dry-run", lab=lab_env)
    assert run.code == 0, run.err
    assert (
        run.out.startswith(f"--- a/{name}.xml")
        and "+    <qemu:device alias='ua-vfio-0000-3b-00-1'>" in run.out
    )
    assert definition(lab_env, name) == original
    lab_env.remove(name)


def test_bad_input_one_line_and_nothing_written(lab_env: Any) -> None:
    plain = define(lab_env, devices=False)
    run = events("enable", plain, lab=lab_env)
    assert run.code == 6, run.err
    expected = f"orchestrator: nothing to do: {plain} has no VFIO device; only VFIO PCI"
    assert run.err.startswith(expected), run.err
    assert len(run.err.splitlines()) == 1, run.err
    status = events("status", plain, lab=lab_env)
    assert status.code == 6 and f"nothing to do: {plain} has no VFIO device" in status.err, status.err
    conflicting = define(
        lab_env,
        extra="  <qemu:commandline>\n    <qemu:arg value='-global'/>\n"
        "    <qemu:arg value='vfio-pci.migration-events=off'/>\n  </qemu:commandline>\n",
    )
    before = definition(lab_env, conflicting)
    run = events("enable", conflicting, lab=lab_env)
    assert run.code == 2 and "migration-events=off" in run.err, run.err
    assert run.err.startswith(f"orchestrator: error: {conflicting}: "), "the error names the domain"
    assert definition(lab_env, conflicting) == before
    run = events("status", "no-such-domain", lab=lab_env)
    assert run.code == 2 and "no domain 'no-such-domain'" in run.err
    run = events("enable", plain, "--mode", "sideways", lab=lab_env)
    assert run.code == 2 and "--mode" in run.err
    for r in (run,):
        assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    lab_env.remove(plain)
    lab_env.remove(conflicting)


def test_lab_guest_emits_only_after_enable_and_a_cold_boot(
    lab_env: Any, recorder: Any, tmp_path: Path
) -> None:
    name = lab_env.guest(0, events=False)
    rec = recorder(name)
    lab_env.migrate(name, 0, 1)
    rec.wait_for(lambda evs: any(e.host == 1 and e.event == "RESUME" for e in evs))
    assert rec.vfio(0) == [] and rec.vfio(1) == []

    run = events("enable", name, "--json", lab=lab_env, host=1)
    assert run.code == 0 and run.doc["changed"] is True and run.doc["mode"] == "global", run.err
    assert "cold boot" in run.doc["message"]
    status = events("status", name, "--json", lab=lab_env, host=1).doc
    assert status["devices"][0]["defined_on"] is True and status["devices"][0]["running_on"] is False
    assert status["qemu_knows_event"] is True and status["qemu_knows_prepare"] is True

    rec2 = recorder(name)
    lab_env.migrate(name, 1, 0)  # not yet cold-booted: still silent
    rec2.wait_for(lambda evs: any(e.host == 0 and e.event == "RESUME" for e in evs))
    assert rec2.vfio(1) == []

    conn = lab_env.conn(0)
    dom = conn.domain(name)
    dom.raw.destroy()
    dom.raw.create()
    rec3 = recorder(name)
    lab_env.migrate(name, 0, 1)
    rec3.wait_for(lambda evs: any(e.host == 1 and e.vfio == ("nic0", "running") for e in evs))
    assert [s for _d, s in rec3.vfio(0)][:2] == ["pre-copy", "pre-copy-p2p-prepare"]
    assert (
        json.loads(events("status", name, "--json", lab=lab_env, host=1).out)["devices"][0]["running_on"]
        is True
    )
    lab_env.remove(name)
