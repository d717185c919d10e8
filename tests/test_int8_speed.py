"""scripts/int8_speed.py end to end on one narrow CIFAR ResNet and one pruned zoo teacher (no timing is asserted):
kdtool's own export writes each fp32/int8 pair, both are timed at each thread count, the pruned teacher keeps at most
the target share of its MACs, the int8 profile names QLinearConv (the int8 model really runs int8 convolutions), the
GEMM ceiling is measured, and the table and its JSON are written."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "int8_speed.py"


def test_int8_speed_writes_the_table_from_kdtool_exports(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("int8_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WIDTHS", {"narrow": (4, 4, 8, 8)})
    out = tmp_path / "int8.md"
    args = ["--rounds", "1", "--repeats", "1", "--batch", "4", "--threads", "1", "2", "--gemm-size", "64",
            "--pruned", "cifar_resnet8", "--target", "0.5", "--out", str(out)]
    assert module.main(args) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    pruned, narrow = data["models"]
    assert narrow["model"] == "narrow"
    name, share = pruned["model"].split(" pruned to ")
    assert name == "cifar_resnet8" and float(share.split("%")[0]) <= 50.0
    for row in (narrow, pruned):
        assert sorted(row["threads"]) == ["1", "2"]
        for t in row["threads"].values():
            assert t["fp32_ips"] > 0 and t["int8_ips"] > 0 and abs(t["ratio"] - t["int8_ips"] / t["fp32_ips"]) < 1e-9
    assert "QLinearConv" in data["int8_profile"]
    assert data["gemm_gops"]["fp32"] > 0 and data["gemm_gops"]["int8"] > 0
    text = out.read_text()
    assert "| narrow |" in text and "| cifar_resnet8 pruned to " in text and "int8 / fp32, 2 thr" in text


@pytest.mark.parametrize("flags, isa", [("avx2 avx512f avx512bw avx512_vnni", "AVX-512 VNNI"), ("avx2 avx_vnni", "AVX-VNNI"),
                                        ("avx2 avx512f avx512bw", "AVX-512, no VNNI"), ("sse4_2 avx avx2", "AVX2, no VNNI")])
def test_the_table_names_the_cpus_int8_instructions(flags, isa):
    """The int8 speed-up depends on them (VNNI or not), so the table's header says which the CPU has."""
    spec = importlib.util.spec_from_file_location("int8_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cpuinfo = f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu {flags} sha_ni\n"
    assert module.cpu_name(cpuinfo) == f"AMD EPYC, {isa}"
