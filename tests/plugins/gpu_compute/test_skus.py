from __future__ import annotations

from pathlib import Path

import pytest

from vetd.plugins.gpu_compute import skus


@pytest.mark.parametrize(("nvml_name", "sku"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"), ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"),
    ("Tesla T4", "T4"),
])
def test_the_shipped_table_knows_the_common_skus(nvml_name: str, sku: str) -> None:
    found = skus.lookup(nvml_name)
    assert found is not None and found.name == sku
    assert {"tflops_fp64", "tflops_fp32", "tflops_fp16", "mem_gbps"} <= set(found.peak)
    assert all(found.floor[k] < found.peak[f"tflops_{k.split('_')[1]}"] for k in found.floor if k.startswith("tflops"))


def test_an_unknown_gpu_has_no_reference() -> None:
    assert skus.lookup("NVIDIA B300 SXM6") is None


def test_a_site_table_comes_first(tmp_path: Path) -> None:
    site = tmp_path / "skus.toml"
    site.write_text('[[sku]]\nname = "our H200"\nmatch = ["NVIDIA H200"]\n[sku.floor]\ntflops_fp64 = 55.0\n')
    found = skus.lookup("NVIDIA H200", str(site))
    assert found is not None and found.name == "our H200" and found.floor == {"tflops_fp64": 55.0}
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sku]]\nname = "x"\nmatch = ["y"]\nflor = {}\n')
    with pytest.raises(ValueError, match="bad.toml: not a SKU table"):
        skus.lookup("y", str(bad))
