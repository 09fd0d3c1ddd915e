"""The README's pictures of the Prefect UI, made by the project itself: a real `prefect server` (with its UI), one
`sdrpn` run of a small config against it, then headless Chromium on the flow-run page and the report artifact.
The store is a local S3-compatible server (moto), so the report shows its pictures through presigned URLs, as it
does on a team's bucket.

    python docs/screenshots.py [--out docs/images] [--config configs/default.yaml] [--train-n N --eval-n N]

Needs Chromium (Debian: `apt-get install chromium`); prints where the pictures went and `RESULT pages=<n>`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {seconds:.0f} s")


def _api(base: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{base}/api{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def shoot(chromium: str, url: str, out: Path, size: str = "1400,1000") -> Path:
    """One page, rendered by headless Chromium after its scripts settle."""
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
           "--virtual-time-budget=20000", f"--screenshot={out}", url]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def _s3_store(cfg, env: dict):
    """A moto S3 server on 127.0.0.1 (stopped with the process) and a bucket on it, as the run's store."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    endpoint = f"http://127.0.0.1:{port}"
    env.update({"AWS_ACCESS_KEY_ID": "screenshots", "AWS_SECRET_ACCESS_KEY": "screenshots"})
    import s3fs

    s3fs.S3FileSystem(key="screenshots", secret="screenshots", client_kwargs={"endpoint_url": endpoint}).mkdir("runs")
    return cfg.store.model_copy(update={"root": "s3://runs/sdrpn", "endpoint_url": endpoint})


def run_and_shoot(out: Path, config: str | None, train_n: int | None, eval_n: int | None, chromium: str) -> list[Path]:
    from benchmarks._pipeline import pipeline_config

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect", "PREFECT_API_URL": f"{base}/api",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"{base}/api"}  # fmt: skip
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            _wait(f"{base}/api/health")
            cfg = pipeline_config(config, tmp, train_n=train_n, eval_n=eval_n)
            cfg = cfg.model_copy(update={"store": _s3_store(cfg, env)})
            cfg_path = Path(tmp) / "config.json"
            cfg_path.write_text(cfg.model_dump_json())
            script = "from flows.pipeline import sdrpn, load_config; import sys; sdrpn(load_config(None, sys.argv[1]))"
            subprocess.run([sys.executable, "-c", script, str(cfg_path)], env={**env, "PYTHONPATH": str(ROOT)},
                           check=True, cwd=ROOT)  # fmt: skip
            run = _api(base, "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": True}}})[0]
            from flows.publish import key

            report = _api(base, "/artifacts/filter", {"artifacts": {"key": {"any_": [key(cfg, "report")]}}})[0]
            out.mkdir(parents=True, exist_ok=True)
            return [
                shoot(chromium, f"{base}/runs/flow-run/{run['id']}", out / "prefect-run.png"),
                shoot(chromium, f"{base}/artifacts/artifact/{report['id']}", out / "prefect-report.png", "1400,2300"),
            ]
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "docs" / "images"))
    p.add_argument("--config", default=None)
    # default: the config's own sizes, so the pictures show the README table's numbers
    p.add_argument("--train-n", type=int, default=None, help="at most this many training scenes")
    p.add_argument("--eval-n", type=int, default=None, help="at most this many evaluation / calibration scenes")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("docs/screenshots.py needs Chromium (Debian: apt-get install chromium)")
    pages = run_and_shoot(Path(args.out), args.config, args.train_n, args.eval_n, chromium)
    for page in pages:
        print(f"wrote {page}")
    print(f"RESULT pages={len(pages)}")


if __name__ == "__main__":
    main()
