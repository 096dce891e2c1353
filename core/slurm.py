"""What both sides need to speak to Slurm: vetd's drain-reason convention and where scontrol is.

The controller drains through ``scontrol`` (:mod:`vetd.controller.actions`), and
so does ``vetd slurm prolog`` on a node fault (:mod:`vetd.agent.slurm`). Either
way the reason starts with :data:`REASON_PREFIX`: the controller resumes only
drains whose reason does, never an operator's.
"""

from __future__ import annotations

import os
import re
import shutil

REASON_PREFIX = "vetd:"
MAX_REASON_CHARS = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: Where scontrol lives when PATH does not say (slurmd runs a prolog with no PATH at all).
SLURM_BIN_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/opt/slurm/bin")


def clean_reason(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """A drain reason safe to hand to ``scontrol``: one line, bounded, no control characters."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def find_program(name: str) -> str:
    """``name`` as given if it is a path, else found in PATH or :data:`SLURM_BIN_DIRS`; else ``name``."""
    if os.sep in name:
        return name
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SLURM_BIN_DIRS)) or name
