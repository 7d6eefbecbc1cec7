"""``neurorecon validate``: the official BIDS validator on a dataset, before a long run.

Runs ``bids-validator-deno`` (the BIDS project's validator, from PyPI: ``pip install
bids-validator-deno``) with JSON output and prints one line per kind of issue: severity, code,
the field or column it concerns, how many files and the first of them. Errors stop the command
(exit 2); warnings are listed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from neurorecon.models.common.checks import DataError
from neurorecon.models.common.logging import logger

VALIDATOR = "bids-validator-deno"
TIMEOUT_S = 600


@dataclass(frozen=True)
class Issue:
    """One kind of validator issue: ``(severity, code, sub_code)`` over ``count`` files."""

    severity: str
    code: str
    sub_code: str | None
    count: int
    first: str

    def line(self) -> str:
        what = self.code if self.sub_code is None else f"{self.code} ({self.sub_code})"
        return f"{self.severity:7s} {what}: {self.count} file(s), e.g. {self.first}"


def validator_command() -> str:
    """Path of the validator executable (next to this Python first), or a DataError."""
    local = Path(sys.executable).parent / VALIDATOR
    found = str(local) if local.is_file() else shutil.which(VALIDATOR)
    if found is None:
        raise DataError(f"the BIDS validator ({VALIDATOR}) is not installed",
                        hint=f"pip install {VALIDATOR}")
    return found


def validate_bids(root: str | Path) -> list[Issue]:
    """Run the BIDS validator on ``root``; the issues it reports, grouped by kind."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("not a directory", path=root)
    proc = subprocess.run([validator_command(), "--format", "json", str(root)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise DataError(f"the BIDS validator failed (exit {proc.returncode}): "
                        f"{proc.stderr.strip()[-500:]}", path=root) from None
    found = report["issues"]["issues"]
    counts = Counter((i["severity"], i["code"], i.get("subCode")) for i in found)
    first: dict[tuple, str] = {}
    for i in found:
        first.setdefault((i["severity"], i["code"], i.get("subCode")), i.get("location", ""))
    order = {"error": 0, "warning": 1}
    return [Issue(*key, n, first[key]) for key, n in
            sorted(counts.items(), key=lambda kv: (order.get(kv[0][0], 2), kv[0][1],
                                                   kv[0][2] or ""))]


def run(cfg: DictConfig) -> list[Issue]:
    """Stage entry point (Hydra root config ``validate.yaml``): validate ``data.root``."""
    root = Path(cfg.data.root)
    issues = validate_bids(root)
    errors = [i for i in issues if i.severity == "error"]
    n_warn = sum(i.count for i in issues if i.severity == "warning")
    logger.info("BIDS validator on %s: %d error(s), %d warning(s)", root,
                sum(i.count for i in errors), n_warn)
    for issue in issues:
        logger.info("  %s", issue.line())
    if errors:
        first = errors[0]
        what = first.code if first.sub_code is None else f"{first.code} ({first.sub_code})"
        raise DataError(f"not valid BIDS: {sum(i.count for i in errors)} error(s), the first "
                        f"{what} in {first.first}", path=root,
                        hint=f"run {VALIDATOR} {root} for the full report")
    return issues
