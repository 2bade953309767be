"""What every `medi` process sets up before its work: the offline environment (no hub, no telemetry) and the
log format. The CLI calls it, and so does a sweep worker (a spawned interpreter that never sees the CLI)."""
from __future__ import annotations

import logging
import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
}
QUIET = ("alembic", "mlflow", "urllib3", "matplotlib", "PIL")


def setup(level: int = logging.INFO) -> None:
    """Offline variables (unless set), and logging at `level` as `HH:MM:SS LEVEL logger: message`."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
