"""Real OCI containers for tests: runc with a busybox-static rootfs, and libraries to load."""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

#: Where Debian (and most distributions) keep shared libraries.
_LIBRARY_GLOBS = ("/lib/x86_64-linux-gnu/libz.so.*", "/usr/lib/x86_64-linux-gnu/libz.so.*", "/lib64/libz.so.*",
                  "/usr/lib64/libz.so.*", "/lib/*-linux-gnu/libz.so.*", "/usr/lib/*-linux-gnu/libz.so.*")


def system_library() -> Path:
    """A real shared library of this machine (zlib), to stand in for a plugin library that loads."""
    for pattern in _LIBRARY_GLOBS:
        for found in sorted(glob.glob(pattern)):  # noqa: PTH207 - absolute patterns
            path = Path(found).resolve()
            if path.is_file():
                return path
    raise AssertionError("no libz shared library on this machine")


def busybox() -> str | None:
    for candidate in (shutil.which("busybox"), "/bin/busybox", "/usr/bin/busybox"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def bundle(root: Path, args: list[str], hooks: dict[str, Any], annotations: dict[str, str]) -> Path:
    """An OCI bundle in ``root``: a busybox rootfs and `runc spec`'s config.json, adjusted for tests.

    Root, no user namespace, no network namespace (nothing to set up), a read-only rootfs, a
    cgroup of its own, no terminal.
    """
    box = busybox()
    assert box, "busybox-static is not installed"
    (root / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(box, root / "rootfs" / "bin" / "busybox")
    for applet in ("sh", "echo", "true", "cat", "sleep"):
        (root / "rootfs" / "bin" / applet).symlink_to("busybox")
    subprocess.run(["runc", "spec"], cwd=root, check=True, capture_output=True, timeout=30)
    config = json.loads((root / "config.json").read_text())
    config["process"].update(terminal=False, args=args)
    config["root"]["readonly"] = True
    config["linux"]["namespaces"] = [ns for ns in config["linux"]["namespaces"] if ns["type"] != "network"]
    # its own cgroup even beside another worker's container of the same bundle name
    config["linux"]["cgroupsPath"] = f"/vetd-test-{root.name}-{uuid.uuid4().hex[:8]}"
    config["hooks"] = hooks
    config["annotations"] = annotations
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return root


def runc_run(bundle_dir: Path, state_root: Path, name: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``runc run`` the bundle in the foreground; its exit status, stdout and stderr."""
    try:
        return subprocess.run(["runc", "--root", str(state_root), "run", "--bundle", str(bundle_dir), name],
                              capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        subprocess.run(["runc", "--root", str(state_root), "delete", "--force", name],
                       capture_output=True, timeout=30, check=False)
