"""The OCI hook files shipped in packaging/oci/ (podman and CRI-O hooks.d, runc's config.json)."""

from __future__ import annotations

import json
import re

from tests.support.procs import REPO
from vetd.agent.config import default_requirements
from vetd.agent.ocihook import START_STAGES, STOP_STAGES

OCI = REPO / "packaging" / "oci"


def test_hooks_d_files_run_the_hook_for_annotated_containers() -> None:
    for name, stage in (("vetd-prestart.json", "prestart"), ("vetd-poststop.json", "poststop")):
        hook = json.loads((OCI / name).read_text())
        assert hook["version"] == "1.0.0" and hook["stages"] == [stage]
        assert hook["hook"]["args"] == ["vetd-oci-hook", stage] and hook["hook"]["path"].endswith("/vetd-oci-hook")
        assert "VETD_CONFIG=/etc/vetd/agent.toml" in hook["hook"]["env"]
        [(key, value)] = hook["when"]["annotations"].items()
        # Go's RE2 syntax; these patterns mean the same in Python's re
        for annotation in default_requirements():
            assert re.search(key, annotation)
        assert not re.search(key, "com.hooks.aws_ofi_nccl.variant")
        assert all(re.search(value, v) for v in ("true", "TRUE", "1", "yes", "on"))
        assert not any(re.search(value, v) for v in ("false", "0", "truex"))


def test_runc_snippet_names_known_stages() -> None:
    hooks = json.loads((OCI / "runc-hooks.json").read_text())
    for stage, entries in hooks.items():
        assert stage in START_STAGES + STOP_STAGES
        assert [entry["args"] for entry in entries] == [["vetd-oci-hook", stage]]
