"""The SKU table: published peaks and floors per GPU model, matched by NVML name (``skus.toml``)."""

from __future__ import annotations

import functools
import re
import tomllib
from importlib import resources
from pathlib import Path

import msgspec


class Sku(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    #: Regular expressions matched against the whole NVML name, case-insensitive.
    match: list[str]
    #: Published peaks: ``tflops_fp64``…, ``mem_gbps``.
    peak: dict[str, float] = {}
    #: Floors by metric name (``tflops_fp16``, ``copy_gbps``, ``h2d_gbps``, ``nccl_busbw_gbps``…).
    floor: dict[str, float] = {}

    def matches(self, gpu_name: str) -> bool:
        return any(re.fullmatch(pattern, gpu_name.strip(), re.IGNORECASE) for pattern in self.match)


class SkuTable(msgspec.Struct, forbid_unknown_fields=True):
    sku: list[Sku] = []


def parse(text: str, source: str) -> list[Sku]:
    """A SKU table from TOML text; ``ValueError`` naming ``source`` when it is not one."""
    try:
        return msgspec.convert(tomllib.loads(text), SkuTable).sku
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{source}: not a SKU table: {exc}") from exc


@functools.cache
def shipped() -> tuple[Sku, ...]:
    text = resources.files(__package__).joinpath("skus.toml").read_text(encoding="utf-8")
    return tuple(parse(text, "skus.toml"))


def table(site_file: str = "") -> list[Sku]:
    """The site's entries (if any) before the shipped ones."""
    site = parse(Path(site_file).read_text(encoding="utf-8"), site_file) if site_file else []
    return [*site, *shipped()]


def lookup(gpu_name: str, site_file: str = "") -> Sku | None:
    """The first entry whose pattern matches ``gpu_name``; None for a GPU no table knows."""
    return next((sku for sku in table(site_file) if sku.matches(gpu_name)), None)
