"""Shared by every test: nothing but making `tests/` importable (`unit.scripted`, `lab.runner`,
`lab.benchtools`).

The lab's fixtures live in tests/lab/conftest.py, so that the unit tests never import libvirt.
"""
