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


@pytest.mark.parametrize(("table", "match"), [
    ('[cluster]\ngateway_id = "gw 1; DROP"', "cluster.gateway_id"),
    ('[cluster]\ngateway_id = "' + "x" * 65 + '"', "cluster.gateway_id"),
    ('[cluster]\nobjects = "s3"', "cluster.objects"),
    ('[cluster]\nobjects = "database"', "needs db_url"),
    ('db_url = "postgresql://h/db"\n[cluster]\nobjects = "database"\nobjects_dir = "/x"',
     "objects_dir is for"),
    ("[cluster]\nlease_seconds = 0.5", "cluster.lease_seconds"),
    ("[cluster]\ndb_pool = 1", "cluster.db_pool"),
    ('[cluster]\ndb_pool = "8"', "cluster.db_pool"),
    ("[readers]\nawareness_items = 1", "readers_awareness_items"),
    ("[readers]\nimage_root = 3", "readers.image_root"),
    ("[cluster]\nleases = 3", "unknown setting"),
])
def test_impossible_cluster_and_reader_settings_are_configuration_errors(tmp_path, table,
                                                                         match):
    path = tmp_path / "gw.toml"
    path.write_text(table + "\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_the_default_gateway_id_is_unique_on_a_host(tmp_path):
    import os
    import socket

    fixed = GatewayConfig(dicom_port=11112).validate()
    assert fixed.gateway_id() == f"{socket.gethostname()}:RADGUARD:11112"
    free = GatewayConfig(dicom_port=0).validate()  # any free port: the process tells apart
    assert free.gateway_id().endswith(f":0:{os.getpid()}")
    assert GatewayConfig(cluster_gateway_id="gw1").validate().gateway_id() == "gw1"
