"""Finding backends: the entry-point group, 'auto', and what a missing extra says."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

import neuroscope.backend as backend_module
from neuroscope.errors import BackendUnavailable, ConfigError


def _with_entry_points(monkeypatch, *eps: EntryPoint) -> None:
    monkeypatch.setattr(
        backend_module, "entry_points", lambda group: [ep for ep in eps if ep.group == group]
    )


class FakeMLX:
    @classmethod
    def is_available(cls) -> bool:
        return True


class FakeTorch(FakeMLX):
    pass


@pytest.mark.parametrize(
    ("platform", "machine", "want"),
    [("darwin", "arm64", FakeMLX), ("linux", "x86_64", FakeTorch), ("darwin", "x86_64", FakeTorch)],
)
def test_auto_picks_mlx_on_apple_silicon_and_torch_elsewhere(monkeypatch, platform, machine, want):
    group = backend_module.ENTRY_POINT_GROUP
    _with_entry_points(
        monkeypatch,
        EntryPoint("mlx", f"{__name__}:FakeMLX", group),
        EntryPoint("torch", f"{__name__}:FakeTorch", group),
    )
    monkeypatch.setattr(backend_module.sys, "platform", platform)
    monkeypatch.setattr(backend_module.platform, "machine", lambda: machine)
    assert backend_module.load_backend_class("auto") is want


def test_missing_extra_says_what_to_install(monkeypatch):
    _with_entry_points(
        monkeypatch,
        EntryPoint("mlx", "no_such_framework_xyz:Backend", backend_module.ENTRY_POINT_GROUP),
    )
    with pytest.raises(BackendUnavailable, match=r"pip install -e '\.\[mlx\]'"):
        backend_module.load_backend_class("mlx")


def test_unknown_backend_lists_the_installed_ones(monkeypatch):
    _with_entry_points(
        monkeypatch,
        EntryPoint("torch", "neuroscope.backend:Backend", backend_module.ENTRY_POINT_GROUP),
    )
    with pytest.raises(ConfigError, match="Installed backends: torch"):
        backend_module.load_backend_class("tpu")


def test_third_party_plugins_are_found_through_the_entry_point_group():
    names = {ep.name for ep in backend_module.entry_points(group=backend_module.ENTRY_POINT_GROUP)}
    assert {"mlx", "torch"} <= names
