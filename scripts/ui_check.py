"""Check, in a real headless browser, the MLflow pages a user visits after `make repro`, and keep screenshots.

Starts `mlflow ui` on the pipeline's store (params tracking.uri, or MLFLOW_TRACKING_URI) on a free port, then
renders with headless Chromium (Debian: `apt-get install chromium`):

1. the experiment, opened by the link `make ui` prints (`#/experiments/<id>?workflowType=machine_learning`: MLflow
   3.17 opens a browser's first visit in its GenAI mode otherwise), on its runs table with the train runs listed;
2. the compare page of train-cls vs train-medi (params and the loss / fid charts);
3. the artifacts of the train-medi run (checkpoints/, grids/; the model itself is a logged model, shown on the
   experiment's Models tab and in the registry);
4. the registered model medi-medi and its versions.

Each page's rendered DOM is searched for what must be there; screenshots go to `reports/ui/` (or --out).
Exit status 1 names the page that lacks something.

    python scripts/ui_check.py [--params params.yaml] [--out reports/ui] [--chromium chromium]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(chromium: str, url: str, screenshot: Path, budget_ms: int) -> str:
    """The DOM of `url` after `budget_ms` of virtual time, and a screenshot of it."""
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1600,1000",
              f"--virtual-time-budget={budget_ms}", "--run-all-compositor-stages-before-draw"]
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=False)
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=False)
    return dom.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/ui")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--budget-ms", type=int, default=20000, help="virtual time a page gets to render")
    ap.add_argument("--start-timeout", type=int, default=300, help="seconds the MLflow server may take to start")
    ap.add_argument("--url", help="check this running MLflow UI (e.g. http://127.0.0.1:5000 of `make ui`) instead of "
                                  "starting one on the store")
    args = ap.parse_args()

    import mlflow

    from medi import config, tracking

    cfg = config.load(args.params)
    uri = tracking.tracking_uri(cfg.tracking)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        print(f"no experiment {cfg.tracking.experiment!r} in {uri}: run `make repro` first", file=sys.stderr)
        return 2
    runs = {r.data.tags.get("medi.stage"): r for r in mlflow.search_runs(
        [experiment.experiment_id], "tags.`medi.stage` LIKE 'train@%'", order_by=["start_time DESC"],
        output_format="list")[::-1]}           # the latest run of each stage
    missing = [s for s in ("train@cls", "train@medi") if s not in runs]
    if missing:
        print(f"no run of {missing} in {uri}: run `make repro` first", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = args.url.rstrip("/") if args.url else f"http://127.0.0.1:{port}"
    server = None if args.url else subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        for _ in range(args.start_timeout):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            print("the MLflow server did not start", file=sys.stderr)
            return 1
        eid, cls, medi = experiment.experiment_id, runs["train@cls"].info.run_id, runs["train@medi"].info.run_id
        pages = {
            # MLflow 3.17's UI opens in its GenAI mode unless the browser chose "Model training" before (local
            # storage) or the link says so: `make ui` prints this link
            "runs_table": (f"{base}/#/experiments/{eid}?workflowType=machine_learning", ["train-cls", "train-medi"]),
            "compare_cls_medi": (f"{base}/#/compare-runs?runs={quote(json.dumps([cls, medi]))}"
                                 f"&experiments={quote(json.dumps([eid]))}", ["train-cls", "train-medi", "loss"]),
            # the checkpoints are the run's artifacts; the model is a logged model (the Models tab, the registry)
            "artifacts_train_medi": (f"{base}/#/experiments/{eid}/runs/{medi}/artifacts", ["checkpoints", "grids"]),
            "registered_medi_medi": (f"{base}/#/models/medi-medi", ["medi-medi", "Version 1"]),
        }
        failed = []
        for name, (url, needles) in pages.items():
            dom = render(args.chromium, url, out / f"{name}.png", args.budget_ms)
            lacking = [n for n in needles if n not in dom]
            if name == "runs_table" and "Overview" in dom and "train-cls" not in dom:
                lacking.append("(the GenAI overview opened instead of the runs table)")
            print(f"{name}: {url}\n  screenshot {out / (name + '.png')}; " + (f"LACKS {lacking}" if lacking else "ok"))
            if lacking:
                failed.append(name)
        return 1 if failed else 0
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
