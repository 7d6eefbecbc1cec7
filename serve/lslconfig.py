"""liblsl configuration for this package's processes: discovery kept on this machine, and every
stream on it found.

With ``ResolveScope = machine`` alone (``shared/lsl_api.cfg``), liblsl answers discovery on a
loopback port that every outlet of the machine binds, and Linux hands each query to one socket
only: just the most recently created outlet is found (two outlets in one or two processes:
one found; measured with liblsl 1.17.7). Adding ``KnownPeers = {127.0.0.1}`` makes liblsl also
query the loopback peer directly, which finds them all; the scope stays this machine.
:func:`use_loopback_discovery` writes such a copy of the configuration in use and points
``LSLAPICFG`` at it; it must run before liblsl loads (``mne_lsl.lsl`` import).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_MACHINE = "[multicast]\nResolveScope = machine\n"
_PEERS = "KnownPeers = {127.0.0.1}"


def use_loopback_discovery() -> Path:
    """Point ``LSLAPICFG`` at the configuration in use (or a machine-scoped one) with the
    loopback peer added; return its path. Idempotent."""
    current = os.environ.get("LSLAPICFG")
    text = Path(current).read_text() if current and Path(current).is_file() else _MACHINE
    if "ResolveScope" not in text:
        text = _MACHINE + text
    if "KnownPeers" in text:
        return Path(current) if current else _write(text)
    if re.search(r"^\[lab\]\s*$", text, re.M):
        text = re.sub(r"^\[lab\]\s*$", f"[lab]\n{_PEERS}", text, count=1, flags=re.M)
    else:
        text = text.rstrip("\n") + f"\n\n[lab]\n{_PEERS}\n"
    return _write(text)


def _write(text: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"neurorecon-lsl-{os.getuid()}.cfg"
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("; written by neurorecon.serve.lslconfig (a copy of LSLAPICFG plus "
                       "the loopback peer)\n" + text)
        os.replace(tmp, path)
    os.environ["LSLAPICFG"] = str(path)
    return path
