"""The service's child processes (the job workers, the stream decoder), started one way:
``python -m neurorecon.serve.<module> <args> <service pid>``, their output appended to a log;
each exits when the service pid is no longer its parent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launch(module: str, *args: str, log: Path, pass_fds: tuple[int, ...] = ()
           ) -> subprocess.Popen:
    """Start ``neurorecon.serve.<module>`` with ``args`` and this process' pid last; its
    stdout and stderr go to ``log`` (appended); ``pass_fds``: descriptors it inherits."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", f"neurorecon.serve.{module}", *args, str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, pass_fds=pass_fds)
