"""Vetting protocols: the checks a user chooses to vet an allocation (`vetd check --protocol FILE`).

vetd's own format (examples in ``packaging/protocols/``)::

    name: H200 allocation          # what it is, for people
    profile: prolog                # sizes the checks use: prolog (default) or full
    checks:
      - gpu_idle                   # a check by name, with its plugin's config...
      - nccl_allreduce:            # ...or with keys of its plugin's [plugins.NAME]
          min_busbw_gbps: 300      #    table, for this run only

CSCS vetnode's format is read too (``name``, ``evals: [{name, type, ...}]``),
each eval mapped onto the vetd check that does its work:

=========================  ================  =========================================
vetnode ``type`` (last     vetd check        parameters
dotted part)
=========================  ================  =========================================
``GPUEval``                ``gpu_idle``      ``max_temp`` → ``idle_temp_max_c``,
                                             ``max_used_memory`` (0–1) →
                                             ``idle_memory_used_fraction``
``NCCLEval``,              ``nccl_allreduce`` ``min_bandwidth`` ("20 GB/s") →
``NcclLibEval``                              ``min_busbw_gbps``; ``payload`` ("2 GB") →
                                             the largest size of the sweep
``CUDAEval``               ``gpu_gemm``      none
=========================  ================  =========================================

vetnode's own runtime keys (``requirements``, ``scheduler``, ``method``,
``warmup``) have no meaning here and are ignored; an eval type vetd cannot map
is an error naming file, line and type, never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from vetd.core.configfile import ConfigError, dec_hook, read_text


class ProtocolError(ConfigError):
    """A protocol file vetd cannot run; the message names the file and line."""


@dataclass
class Protocol:
    name: str
    profile: str
    checks: list[str]
    #: ``[plugins.NAME]`` keys to set for this run, by table.
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


#: vetnode eval type (last dotted part) → vetd check.
VETNODE_TYPES = {"GPUEval": "gpu_idle", "NCCLEval": "nccl_allreduce", "NcclLibEval": "nccl_allreduce",
                 "CUDAEval": "gpu_gemm"}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?(?:/s)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
         "tib": 2**40}


def _line(node: Any) -> int:
    return int(node.start_mark.line) + 1


def _quantity(value: Any, where: str) -> float:
    """``"20 GB/s"``, ``"2 GB"``, ``20``: bytes (or bytes/s); decimal GB as vetnode writes them."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _QUANTITY.match(str(value))
    if not match:
        raise ProtocolError(f"{where}: expected a size such as \"2 GB\" or \"20 GB/s\", got {value!r}")
    return float(match.group(1)) * _UNIT[(match.group(2) or "").lower()]


def load_protocol(path: Path, check_plugins: Mapping[str, str],
                  tables: Mapping[str, type[msgspec.Struct]], base: Mapping[str, Mapping[str, Any]]) -> Protocol:
    """Parse and validate a protocol. ``check_plugins``: check → plugin (= its config table);
    ``base``: the agent config's ``[plugins]`` tables the overrides apply on top of."""
    try:
        import yaml
    except ImportError as exc:
        raise ProtocolError(f"{path}: reading a protocol needs PyYAML (pip install 'vetd[gpu]')") from exc
    text = read_text(path, "protocol", ProtocolError)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ProtocolError(f"{path}:{mark.line + 1 if mark else 1}: invalid YAML: "
                            f"{getattr(exc, 'problem', None) or exc}") from exc
    if not isinstance(root, yaml.MappingNode):
        raise ProtocolError(f"{path}:1: a protocol is a mapping with `checks:` (vetd) or `evals:` (vetnode)")
    top = {key.value: (key, value) for key, value in root.value}
    plain = yaml.safe_load(text)
    protocol = Protocol(name=str(plain.get("name", path.stem)), profile=str(plain.get("profile", "prolog")), checks=[])
    if protocol.profile not in ("prolog", "full"):
        raise ProtocolError(f"{path}:{_line(top['profile'][1])}: profile: one of prolog, full, not {protocol.profile!r}")
    lines: dict[tuple[str, str], int] = {}
    if "evals" in top:
        _vetnode(path, top["evals"][1], protocol, lines)
    elif "checks" in top:
        _vetd(path, top["checks"][1], protocol, lines, check_plugins)
    else:
        raise ProtocolError(f"{path}:1: no `checks:` (vetd protocol) or `evals:` (vetnode config) list")
    for check_name in protocol.checks:
        if check_name not in check_plugins:
            raise ProtocolError(f"{path}:{lines.get(('', check_name), 1)}: no check named {check_name!r} "
                                f"(checks: {', '.join(sorted(check_plugins))})")
    for table, keys in protocol.overrides.items():
        struct = tables.get(table)
        if struct is None:
            raise ProtocolError(f"{path}: no plugin config table {table!r}")
        try:
            msgspec.convert({**base.get(table, {}), **keys}, struct, dec_hook=dec_hook)
        except msgspec.ValidationError as exc:
            key = next((k for k in keys if f"`$.{k}`" in str(exc) or f"`{k}`" in str(exc)), next(iter(keys)))
            raise ProtocolError(f"{path}:{lines.get((table, key), 1)}: {key}: {exc}".split(" - at `")[0]) from exc
    return protocol


def _vetd(path: Path, node: Any, protocol: Protocol, lines: dict[tuple[str, str], int],
          check_plugins: Mapping[str, str]) -> None:
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise ProtocolError(f"{path}:{_line(node)}: checks: a list of check names")
    for item in node.value:
        if isinstance(item, yaml.ScalarNode):
            name, params = item.value, None
        elif isinstance(item, yaml.MappingNode) and len(item.value) == 1:
            name, params = item.value[0][0].value, item.value[0][1]
        else:
            raise ProtocolError(f"{path}:{_line(item)}: a check is a name, or `name: {{key: value}}`")
        if name not in check_plugins:
            raise ProtocolError(f"{path}:{_line(item)}: no check named {name!r} "
                                f"(checks: {', '.join(sorted(check_plugins))})")
        lines[("", name)] = _line(item)
        protocol.checks.append(name)
        if params is None or (isinstance(params, yaml.ScalarNode) and params.value in ("", "null", "~")):
            continue
        if not isinstance(params, yaml.MappingNode):
            raise ProtocolError(f"{path}:{_line(params)}: {name}: parameters are a mapping of config keys")
        table = check_plugins[name]  # a check's parameters are keys of its plugin's table
        for key, value in params.value:
            protocol.overrides.setdefault(table, {})[key.value] = yaml.safe_load(yaml.serialize(value))
            lines[(table, key.value)] = _line(key)


def _vetnode(path: Path, node: Any, protocol: Protocol, lines: dict[tuple[str, str], int]) -> None:
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise ProtocolError(f"{path}:{_line(node)}: evals: a list of evaluations")
    for item in node.value:
        if not isinstance(item, yaml.MappingNode):
            raise ProtocolError(f"{path}:{_line(item)}: an eval is a mapping with `name` and `type`")
        keys = {k.value: (k, v) for k, v in item.value}
        if "type" not in keys:
            raise ProtocolError(f"{path}:{_line(item)}: eval without a `type`")
        type_node = keys["type"][1]
        kind = str(type_node.value).rsplit(".", 1)[-1]
        name = keys["name"][1].value if "name" in keys else kind
        check = VETNODE_TYPES.get(kind)
        if check is None:
            raise ProtocolError(f"{path}:{_line(type_node)}: eval {name!r}: type {type_node.value!r} has no vetd "
                                f"equivalent (vetd maps: {', '.join(VETNODE_TYPES)})")
        if check not in protocol.checks:
            protocol.checks.append(check)
        lines[("", check)] = _line(item)

        def value(key: str, keys: dict[str, Any] = keys) -> tuple[Any, str]:
            k, v = keys[key]
            return yaml.safe_load(yaml.serialize(v)), f"{path}:{_line(k)}: {key}"

        def put(table: str, key: str, setting: Any, source: str) -> None:
            protocol.overrides.setdefault(table, {})[key] = setting
            lines[(table, key)] = int(source.split(":")[1])

        if kind == "GPUEval":
            if "max_temp" in keys:
                temp, where = value("max_temp")
                put("gpu_health", "idle_temp_max_c", temp, where)
            if "max_used_memory" in keys:
                used, where = value("max_used_memory")
                if not isinstance(used, int | float) or not 0 <= used <= 1:
                    raise ProtocolError(f"{where}: a share of the GPU's memory (0 to 1) is what vetd "
                                        f"compares, not {used!r}")
                put("gpu_health", "idle_memory_used_fraction", float(used), where)
        elif check == "nccl_allreduce":
            if "min_bandwidth" in keys:
                bandwidth, where = value("min_bandwidth")
                put("nccl", "min_busbw_gbps", _quantity(bandwidth, where) / (1e9 if isinstance(bandwidth, str)
                                                                             else 1.0), where)
            if "payload" in keys:
                payload, where = value("payload")
                size = int(_quantity(payload, where)) // 4 * 4
                put("nccl", "max_bytes_prolog", size, where)
                put("nccl", "max_bytes_full", size, where)
