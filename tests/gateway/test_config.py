"""Gateway settings: "auto" check processes resolve per machine, impossible values are clear
configuration errors from the TOML file and from the command line alike."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from radguard.gateway.config import ConfigError, GatewayConfig, load_config


@pytest.mark.parametrize(("cores", "expected"), [(1, 0), (2, 2), (3, 3), (16, 4)])
def test_auto_check_processes_is_one_per_core_at_most_four_none_on_one_core(
        monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    config = GatewayConfig().validate()
    assert config.check_processes == "auto"
    assert config.check_process_count == expected


def test_numbers_from_toml_and_overrides(tmp_path):
    path = tmp_path / "radguard.toml"
    path.write_text('check_processes = 3\n')
    assert load_config(path).check_process_count == 3
    path.write_text('check_processes = "auto"\n')
    assert load_config(path).check_processes == "auto"
    assert load_config(path, check_processes=0).check_process_count == 0


@pytest.mark.parametrize("value", ['"many"', "-1", "33", "2.5", "true", "[2]"])
def test_impossible_check_processes_are_configuration_errors(tmp_path, value):
    path = tmp_path / "radguard.toml"
    path.write_text(f"check_processes = {value}\n")
    with pytest.raises(ConfigError, match="check_processes"):
        load_config(path)


@pytest.mark.parametrize("value", ["x", "-1", "40", "2.5"])
def test_the_command_line_refuses_impossible_check_processes(value):
    from radguard.cli import main

    result = CliRunner().invoke(main, ["serve", "--check-processes", value])
    assert result.exit_code == 2
    assert "--check-processes" in result.output and '"auto" or a number 0-32' in result.output
