"""`python tests/kill_at_step.py STEP <medi arguments>`: run `medi <arguments>` (a training) that SIGKILLs its own
process right after optimizer step STEP, before that step's checkpoint or log: a crash at a known point, for the
resume test (no polling for checkpoint files, nothing timed)."""
from __future__ import annotations

import os
import signal
import sys

from medi import cli, train


def main() -> int:
    at = int(sys.argv[1])
    real_run_stage = train.run_stage

    def kill(step, model):
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return {}

    def run_stage(cfg, name, extra_hooks=()):
        return real_run_stage(cfg, name, extra_hooks=[*extra_hooks, (at, kill)])

    train.run_stage = run_stage          # cli's `medi train` looks it up when it runs
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
