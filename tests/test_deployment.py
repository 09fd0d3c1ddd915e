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


# `sdrpn` commands, several per process (each process start imports Prefect: seconds of CPU); a command is
# ("sdrpn", args…) through the CLI's `main`, or ("toggle", active) for what the UI's schedule toggle does (the
# schedule's `active` set through the API, the variable left as it was)
SESSION = """
import asyncio, contextlib, io, json, sys
from flows.cli import main
from prefect.client.orchestration import get_client

async def toggle(active):
    async with get_client() as c:
        d = await c.read_deployment_by_name("sdrpn/full")
        for s in d.schedules:
            await c.update_deployment_schedule(d.id, s.id, active=active)

out = []
for kind, *args in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = asyncio.run(toggle(*args)) if kind == "toggle" else main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
            print(e.code if not isinstance(e.code, int) else "")
    out.append([rc or 0, buf.getvalue()])
print(json.dumps(out))
"""


def _session(env, *commands) -> list[tuple[int, str]]:
    proc = subprocess.run(
        [sys.executable, "-c", SESSION, json.dumps(commands)], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _check_the_schedule_survives_redeploys(env) -> None:
    """Off by default; `sdrpn schedule on` switches it on, and a second `prefect deploy --all` (after a pull, say)
    keeps it on; `off` switches it off again. A deploy before the choice is recorded fails, naming it."""
    first = subprocess.run(
        [str(BIN / "prefect"), "deploy", "--all", "--no-prompt"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert first.returncode != 0 and "active" in first.stdout + first.stderr
    refused, unset, undeployed, deployed, status, on = _session(
        env, *[("sdrpn", *a) for a in (["deploy"], ["schedule", "status"], ["schedule", "off"], ["deploy"],
                                       ["schedule", "status"], ["schedule", "on"])]
    )  # fmt: skip
    assert refused[0] != 0  # ours names the variable and the fix instead
    assert "sdrpn_weekly_retrain is not set" in refused[1] and "sdrpn schedule off" in refused[1]
    assert "not set" in unset[1] and "not deployed yet" in undeployed[1]
    assert "0 3 * * 1 off" in deployed[1] and "0 3 * * 1 off" in status[1] and "0 3 * * 1 on" in on[1]
    assert all(rc == 0 for rc, _ in (unset, undeployed, deployed, status, on))
    _prefect(env, "deploy", "--all", "--no-prompt")  # the redeploy that used to switch it off
    kept, _, switched, off, after = _session(
        env, ("sdrpn", "schedule", "status"), ("toggle", False), ("sdrpn", "schedule", "status"),
        ("sdrpn", "schedule", "off"), ("sdrpn", "schedule", "status"),
    )  # fmt: skip
    assert "0 3 * * 1 on" in kept[1]
    assert "switched in the UI?" in switched[1] and "`sdrpn schedule off` keeps it off" in switched[1]
    assert "0 3 * * 1 off" in off[1]
    assert "switched in the UI?" not in after[1]


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
        query = json.dumps({"flow_runs": {"deployment_id": {"is_null_": False}}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/flow_runs/filter", query, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            runs = json.loads(r.read())
        assert [r["state_type"] for r in runs] == ["COMPLETED"], runs
        assert list((tmp_path / "store" / "eval").glob("*/_COMMITTED.json"))  # the run wrote its report
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
