"""A fine-tuning run as the server's worker (serve/finetune_runner.py starts `tramontane finetune` with
WORKER_ENV set to its own pid): it yields the CPU to serving (nice 10) and exits when the server has
gone, however it went (a killed server leaves no training process behind; its job resumes from the
last checkpoint at the next start)."""

from __future__ import annotations

import os
import threading
import time

WORKER_ENV = "TRAMONTANE_WORKER_OF"
CHECK_SECONDS = 1.0


def follow_server() -> None:
    """When WORKER_ENV names a pid: lower this process's priority and exit once that parent is gone."""
    parent = os.environ.get(WORKER_ENV)
    if not parent or not parent.isdigit():
        return
    if hasattr(os, "nice"):
        os.nice(10)

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(CHECK_SECONDS)
        os._exit(3)  # the server is gone: nobody reads this run's result

    threading.Thread(target=watch, name="tramontane-follow-server", daemon=True).start()
