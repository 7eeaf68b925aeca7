"""cluster.* settings, and a single process without Redis: redis is not even imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from autoscaler.config import ConfigError, Settings, default_replica_id, load_settings


def test_defaults_are_a_single_process() -> None:
    s = Settings()
    assert s.cluster.redis_url is None
    assert s.cluster.lease_ttl_s == 5.0


def test_replica_id_default_prefers_the_fly_machine() -> None:
    assert default_replica_id({"FLY_MACHINE_ID": "e2865", "FLY_REGION": "ams"}) == "e2865@ams"
    assert default_replica_id({"FLY_MACHINE_ID": "e2865"}) == "e2865"
    host, pid = default_replica_id({}).rsplit(":", 1)
    assert host
    assert int(pid) > 0


def test_the_redis_url_is_a_secret_and_checked(tmp_path: pytest.TempPathFactory) -> None:
    s = Settings.model_validate({"cluster": {"redis_url": "redis://:hunter2@127.0.0.1:6379/0"}})
    assert "hunter2" not in repr(s)
    assert "redis://:hunter2@127.0.0.1:6379/0" in s.secrets()
    path = tmp_path / "bad.yaml"  # type: ignore[operator]
    path.write_text("cluster:\n  redis_url: http://127.0.0.1:6379\n  lease_ttl_s: 0\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = "\n".join(info.value.problems)
    assert "cluster.redis_url" in text
    assert "redis://" in text
    assert "cluster.lease_ttl_s" in text


def test_a_redis_url_option_redis_py_refuses_is_a_config_error(tmp_path: Path) -> None:
    # Accepted by check-config, it made `autoscaler run` die at the start with a traceback.
    path = tmp_path / "c.yaml"
    path.write_text('cluster: {redis_url: "redis://:hunter2@127.0.0.1:1/0?socket_timeout=x"}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    (line,) = info.value.problems
    assert "cluster.redis_url: expected a URL redis-py accepts: Invalid value for" in line
    assert "'socket_timeout'" in line
    assert "hunter2" not in line


@pytest.mark.parametrize("path", ["/x", "/1/2", "/db0"])
def test_a_redis_url_whose_database_is_no_number_is_a_config_error(
    tmp_path: Path, path: str
) -> None:
    # redis-py drops a path that is no number (database 0) and takes the "/"s out of
    # one that has several (/1/2: database 12), so each was accepted and ran elsewhere.
    config = tmp_path / "c.yaml"
    config.write_text(f'cluster: {{redis_url: "redis://:hunter2@127.0.0.1:6379{path}"}}\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    (line,) = info.value.problems
    assert line.endswith(
        "cluster.redis_url: expected a database number after host:port"
        " (redis://host:6379/0), or nothing, got a path that is not one"
    )
    assert "hunter2" not in line


@pytest.mark.parametrize("path", ["", "/", "/0", "/15", "/%31"])
def test_a_redis_url_with_a_database_number_or_none_is_taken(path: str) -> None:
    url = f"redis://127.0.0.1:6379{path}"
    settings = Settings.model_validate({"cluster": {"redis_url": url}})
    assert settings.cluster.redis_url is not None


def test_a_single_process_never_imports_redis() -> None:
    code = (
        "import sys, asyncio\n"
        "from autoscaler.config import Settings\n"
        "from autoscaler.service import Service\n"
        "import autoscaler.cli\n"
        "s = Settings.model_validate({'fly': {'api_url': 'embedded'},"
        " 'proxy': {'listen': '127.0.0.1:9'}, 'admin': {'listen': '127.0.0.1:10'},"
        " 'emulator': {'listen': '127.0.0.1:11'}})\n"
        "async def main():\n"
        "    svc = Service(s, proxy_port=0, admin_port=0, emulator_port=0)\n"
        "    await svc.start(); await svc.stop()\n"
        "asyncio.run(main())\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
        "assert 'autoscaler.state.cluster' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
