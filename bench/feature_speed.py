"""Feature extraction throughput (the FID extractor, which is also the probe's encoder by default) and its share
of this machine's fp32 GEMM peak, timed in the same run (bench/efficiency.py): `make bench`.

Extracts features of `--count` random uint8 tiles at `data.resolution` through the FID path (torch-fidelity's
batching, `medi.embed.preprocess`, the network of params `fid`), after one untimed batch; FLOPs per image are
counted by FlopCounterMode over one batch. Results go to docs/benchmarks.md (section 'features-cpu-<CPU type>').
Usage (from the project root): python bench/feature_speed.py [--count 512] [--params params.yaml]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medi import config
from medi.fidelity import Extractor

sys.path.insert(0, str(Path(__file__).parent))       # run from the project root
from bench_report import cpu_name, machine_tag, write_section  # noqa: E402
from efficiency import counted_flops, gemm_peak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--count", type=int, default=512)
    args = ap.parse_args()
    cfg = config.load(args.params)
    extractor = Extractor.from_config(cfg.fid.encoder)
    r = cfg.data.resolution
    images = np.random.default_rng(0).integers(0, 256, (args.count, r, r, 3), dtype=np.uint8)
    batch = torch.from_numpy(images[:cfg.fid.batch_size]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        flops = counted_flops(lambda: extractor.module(batch)) / len(batch)
    extractor.features(images[:cfg.fid.batch_size], verbose=False)            # untimed: first-call set-up
    t0 = time.perf_counter()
    extractor.features(images, verbose=False)
    ips = args.count / (time.perf_counter() - t0)
    peak, n = gemm_peak("fp32", "cpu")
    share = ips * flops / peak
    print(f"{extractor.name}: {ips:.1f} images/s, {flops / 1e9:.3g} GFLOP per image, {ips * flops / 1e9:.1f} GFLOP/s = "
          f"{100 * share:.0f} % of the fp32 GEMM peak ({peak / 1e9:.1f} GFLOP/s, {n}^3)", flush=True)
    write_section(f"features-cpu-{machine_tag()}",
                  f"Feature extraction on {cpu_name()}, {torch.get_num_threads()} threads (torch {torch.__version__}): "
                  f"{args.count} tiles of {r} px through the FID path, batch {cfg.fid.batch_size}, fp32; the GEMM peak "
                  f"timed in the same run ({n}^3 matmul); `python bench/feature_speed.py --count {args.count}`",
                  ["extractor", "input px", "images/s", "GFLOP/image", "GFLOP/s", "fp32 GEMM peak GFLOP/s",
                   "share of peak"],
                  [[cfg.fid.extractor, cfg.fid.input_size or "own", f"{ips:.1f}", f"{flops / 1e9:.3g}",
                    f"{ips * flops / 1e9:.1f}", f"{peak / 1e9:.1f}", f"{100 * share:.0f} %"]])


if __name__ == "__main__":
    main()
