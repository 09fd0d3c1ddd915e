"""A real `prefect server` + process worker drive `prefect deployment run sdrpn/full` to completion.

Slow (a server and a worker start): `pytest -m "not server"` skips it locally; CI runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.flowkit import make_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.server


def _prefect(env, *args, timeout=120, check=True):
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _sdrpn(env, *args, ok: bool = True) -> str:
    proc = subprocess.run([str(BIN / "sdrpn"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _check_the_schedule_survives_redeploys(env) -> None:
    """Off by default; `sdrpn schedule on` switches it on, and a second `prefect deploy --all` (after a pull, say)
    keeps it on; `off` switches it off again. A deploy before the choice is recorded fails, naming it."""
    first = subprocess.run(
        [str(BIN / "prefect"), "deploy", "--all", "--no-prompt"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert first.returncode != 0 and "active" in first.stdout + first.stderr
    refused = _sdrpn(env, "deploy", ok=False)  # ours names the variable and the fix instead
    assert "sdrpn_weekly_retrain is not set" in refused and "sdrpn schedule off" in refused
    assert "not set" in _sdrpn(env, "schedule", "status")
    assert "not deployed yet" in _sdrpn(env, "schedule", "off")
    assert "0 3 * * 1 off" in _sdrpn(env, "deploy")
    assert "0 3 * * 1 off" in _sdrpn(env, "schedule", "status")
    assert "0 3 * * 1 on" in _sdrpn(env, "schedule", "on")
    _prefect(env, "deploy", "--all", "--no-prompt")  # the redeploy that used to switch it off
    assert "0 3 * * 1 on" in _sdrpn(env, "schedule", "status")
    _toggle_in_the_ui(env, active=False)
    status = _sdrpn(env, "schedule", "status")
    assert "switched in the UI?" in status and "`sdrpn schedule off` keeps it off" in status
    assert "0 3 * * 1 off" in _sdrpn(env, "schedule", "off")
    assert "switched in the UI?" not in _sdrpn(env, "schedule", "status")


def _toggle_in_the_ui(env, active: bool) -> None:
    """What the UI's toggle does: the schedule's `active` set through the API, the variable left as it was."""
    code = (
        "import asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        d = await c.read_deployment_by_name('sdrpn/full')\n"
        "        for s in d.schedules:\n"
        f"            await c.update_deployment_schedule(d.id, s.id, active={active})\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=60)


def test_deployment_run_sdrpn_full(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PWD": str(ROOT),
        "SDRPN_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError("prefect server did not start") from None
                time.sleep(0.5)
        _prefect(env, "work-pool", "create", "sdrpn-process", "--type", "process")
        _check_the_schedule_survives_redeploys(env)
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(make_config("llava", str(tmp_path / "store")).model_dump(mode="json")))
        out = _prefect(env, "deployment", "run", "sdrpn/full", "--param", f"config_path={config}")
        assert "sdrpn/full" in out or "Created flow run" in out
        _prefect(env, "worker", "start", "--pool", "sdrpn-process", "--run-once", timeout=400)
        runs = json.loads(
            _prefect(
                env,
                "api",
                "POST",
                "/flow_runs/filter",
                "--data",
                json.dumps({"flow_runs": {"deployment_id": {"is_null_": False}}}),
            )
        )
        assert [r["state_type"] for r in runs] == ["COMPLETED"], runs
        assert list((tmp_path / "store" / "eval").glob("*/_COMMITTED.json"))  # the run wrote its report
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
