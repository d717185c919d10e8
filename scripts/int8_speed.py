#!/usr/bin/env python
"""How much faster kdtool's int8 ONNX export runs than its fp32 ONNX export on this CPU, and what bounds it.

Three measurements, each a ratio against fp32 timed in the same process (the two models in turns, median of
--rounds rounds of --repeats batches), at each --threads count (default: 1, what prune_cifar10.py times with,
and all cores):

  1. models:  zoo teachers (--pruned) pruned as `kdtool prune` does by default (weight magnitude, one shot) to
              --target of their MACs, which shows which teacher's pruned copy is wide enough for int8 to pay; then
              CIFAR ResNet-20 at several widths: 8-8-16-32 is the pruned resnet20's widths (8-8-17-35) rounded to
              multiples of 8 (prune.round_to=8), 16-16-32-64 the unpruned resnet20, then two and four times as wide.
              Random weights (speed does not depend on their values), each exported by kdtool's own export_model to
              `onnx` and `onnx_int8` (QDQ, int8 weights per channel, uint8 activations calibrated on random images).
              Also --pair FP32 INT8: two files kdtool exported (e.g. runs of prune_cifar10.py).
  2. where the int8 time goes: onnxruntime's profile of the first int8 model, by operator.
  3. the ceiling: one 1024x1024x1024 matrix product, MatMul (fp32) against MatMulInteger (uint8 x int8), the
              kernel int8 convolutions reduce to when they are wide enough to fill it.

  python scripts/int8_speed.py                                   # writes docs/int8_speed.md and .json
  python scripts/int8_speed.py --pair runs/pc/export/seed_0/model.onnx runs/pc/export/seed_0/model.int8.onnx
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
WIDTHS = {"resnet20 with the pruned widths rounded to 8 (8-8-16-32)": (8, 8, 16, 32),
          "resnet20 (16-16-32-64)": (16, 16, 32, 64),
          "resnet20 x2 (32-32-64-128)": (32, 32, 64, 128), "resnet20 x4 (64-64-128-256)": (64, 64, 128, 256)}
PRUNED = ("cifar_resnet20", "cifar_wrn_16_2", "cifar_resnet8x4")


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its int8 instructions, from /proc/cpuinfo (or the text given)."""
    try:
        lines = (Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo).splitlines()
    except OSError:
        return platform.processor() or "cpu"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "cpu")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    # the widest int8 dot-product instructions onnxruntime's kernels can use: they set the int8 speed-up
    for flag, isa in (("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"), ("avx512bw", "AVX-512, no VNNI"),
                      ("avx2", "AVX2, no VNNI")):
        if flag in flags:
            return f"{name}, {isa}"
    return name


def session(path: str, threads: int, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = profile
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def throughputs(paths: list[str], batch: int, threads: int, rounds: int, repeats: int) -> list[float]:
    """Images per second of each ONNX file, timed in turns so that a change in the machine's load hits all alike."""
    sessions = [session(p, threads) for p in paths]
    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(3):
            s.run(None, f)
    seen: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, (s, f) in enumerate(zip(sessions, feeds)):
            t = time.perf_counter()
            for _ in range(repeats):
                s.run(None, f)
            seen[i].append(batch * repeats / (time.perf_counter() - t))
    return [statistics.median(v) for v in seen]


def export_pair(net: torch.nn.Module, folder: Path) -> tuple[str, str]:
    from kdtool.export import Int8Settings, export_model

    net = net.eval()
    images = torch.rand(256, 3, 32, 32)
    settings = Int8Settings(calibration=lambda: images.split(64), test=lambda: [(images, torch.zeros(256).long())],
                            allow_drop=True)
    out = export_model(net, images[:8], folder, ["onnx", "onnx_int8"], rebuild=lambda: net, int8=settings)
    return out["onnx"]["path"], out["onnx_int8"]["path"]


def resnet20(widths: tuple[int, ...]) -> torch.nn.Module:
    from kdtool.cifar_models import CifarResNet

    torch.manual_seed(0)
    return CifarResNet(depth=20, widths=widths, num_classes=10)


def pruned_teacher(name: str, target: float) -> tuple[str, torch.nn.Module]:
    """A zoo model pruned the way `kdtool prune` does by default, and how far (its share of the MACs, its widths)."""
    import timm

    import kdtool.models  # noqa: F401  (registers the CIFAR zoo with timm)
    from kdtool.evaluation import count_macs
    from kdtool.pruning import PruneSettings, prune_network

    torch.manual_seed(0)
    net = timm.create_model(name, num_classes=10).eval()
    pruned = prune_network(net, torch.rand(8, 3, 32, 32), PruneSettings("macs", target)).net
    widths = sorted({m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)})
    kept = count_macs(pruned, (3, 32, 32)) / count_macs(net, (3, 32, 32))
    return f"{name} pruned to {kept:.1%} of its MACs ({widths[0]}-{widths[-1]} channels)", pruned


def int8_profile(path: str, batch: int, threads: int) -> dict[str, float]:
    """Share (%) of the int8 model's kernel time by operator, from onnxruntime's profiler."""
    s = session(path, threads, profile=True)
    feed = {s.get_inputs()[0].name: np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)}
    for _ in range(20):
        s.run(None, feed)
    trace = Path(s.end_profiling())
    per_op: collections.Counter = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    total = sum(per_op.values())
    return {op: round(100.0 * t / total, 1) for op, t in per_op.most_common()}


def gemm_ceiling(threads: int, n: int = 1024, repeats: int = 10) -> dict[str, float]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    rates = {}
    for kind in ("fp32", "int8"):
        if kind == "int8":
            w, x = rng.integers(-127, 128, (n, n)).astype(np.int8), rng.integers(0, 256, (n, n)).astype(np.uint8)
            node, types = helper.make_node("MatMulInteger", ["x", "w"], ["y"]), (TensorProto.UINT8, TensorProto.INT32)
        else:
            w, x = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
            node, types = helper.make_node("MatMul", ["x", "w"], ["y"]), (TensorProto.FLOAT, TensorProto.FLOAT)
        graph = helper.make_graph([node], kind, [helper.make_tensor_value_info("x", types[0], [n, n])],
                                  [helper.make_tensor_value_info("y", types[1], [n, n])], [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        with tempfile.NamedTemporaryFile(suffix=".onnx", delete=False) as f:
            f.write(model.SerializeToString())
        s = session(f.name, threads)
        os.unlink(f.name)
        for _ in range(2):
            s.run(None, {"x": x})
        t = time.perf_counter()
        for _ in range(repeats):
            s.run(None, {"x": x})
        rates[kind] = 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", nargs=2, metavar=("FP32", "INT8"), help="two ONNX files kdtool exported, timed as well")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                   help="onnxruntime thread counts to time with (the profile and the ceiling: the last)")
    p.add_argument("--pruned", nargs="*", default=list(PRUNED), metavar="MODEL", help="zoo teachers to prune and time")
    p.add_argument("--target", type=float, default=0.3, help="share of their MACs the pruned teachers keep")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--gemm-size", type=int, default=1024, help="n of the n x n x n matrix product (the ceiling)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "int8_speed.md")
    args = p.parse_args(argv)

    threads = args.threads[-1]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdtool-int8-speed.") as tmp:
        nets = [pruned_teacher(name, args.target) for name in args.pruned]
        nets += [(name, resnet20(w)) for name, w in WIDTHS.items()]
        pairs = {name: export_pair(net, Path(tmp) / str(i)) for i, (name, net) in enumerate(nets)}
        if args.pair:
            pairs["--pair " + Path(args.pair[0]).parent.name] = tuple(str(Path(q).resolve()) for q in args.pair)
        for name, (fp32, int8) in pairs.items():
            row = {"model": name, "threads": {}}
            for n in args.threads:
                f, q = throughputs([fp32, int8], args.batch, n, args.rounds, args.repeats)
                row["threads"][n] = {"fp32_ips": f, "int8_ips": q, "ratio": q / f}
                print(f"{name}, {n} thread(s): fp32 {f:,.0f} img/s, int8 {q:,.0f} img/s, int8/fp32 {q / f:.2f}", flush=True)
            rows.append(row)
        profile = int8_profile(next(iter(pairs.values()))[1], args.batch, threads)
    print(f"int8 kernel time by operator ({next(iter(pairs))}): {profile}", flush=True)
    gemm = gemm_ceiling(threads, args.gemm_size)
    print(f"{args.gemm_size}^3 matrix product: fp32 {gemm['fp32']:.0f} GFLOP/s, uint8 x int8 {gemm['int8']:.0f} GOP/s, "
          f"int8/fp32 {gemm['int8'] / gemm['fp32']:.2f}", flush=True)

    import onnxruntime

    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_name()}), onnxruntime "
               f"{onnxruntime.__version__}, batch {args.batch}")
    head = "| model |" + "".join(f" fp32 ONNX img/s, {n} thr | int8 img/s, {n} thr | **int8 / fp32, {n} thr** |"
                                 for n in args.threads)
    lines = ["# int8 against fp32 ONNX on this CPU\n", f"{machine}; `python scripts/int8_speed.py`.\n",
             head, "| --- |" + " ---: | ---: | ---: |" * len(args.threads)]
    lines += ["| " + r["model"] + " |" + "".join(f" {t['fp32_ips']:,.0f} | {t['int8_ips']:,.0f} | **{t['ratio']:.2f}** |"
                                                for t in r["threads"].values()) for r in rows]
    lines += ["", f"int8 kernel time by operator, {next(iter(pairs))} ({threads} thread(s)): "
              + ", ".join(f"{op} {share}%" for op, share in profile.items()),
              "", f"One {args.gemm_size}x{args.gemm_size}x{args.gemm_size} matrix product ({threads} thread(s)): fp32 {gemm['fp32']:.0f} "
              f"GFLOP/s, uint8 x int8 {gemm['int8']:.0f} GOP/s: **{gemm['int8'] / gemm['fp32']:.2f}x**, the int8 "
              "speed-up this CPU can give when the layers are wide enough."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "models": rows, "int8_profile": profile,
                                                        "gemm_gops": gemm, "gemm_size": args.gemm_size}, indent=1) + "\n")
    print(f"int8_speed: wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
