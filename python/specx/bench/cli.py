"""``specx-bench``: runs the registered microbenchmarks, prints a table, writes JSON and plots."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

from specx.bench import common
from specx.bench.registry import load_all


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_table(records: list[dict], label_keys: list[str]) -> None:
    rows = [("op", "impl", "case", "ms", "extra MiB", "GB/s", "% copy", "TFLOP/s")]
    for r in records:
        rows.append((r["op"], r["impl"], common.record_label(r, label_keys),
                     _fmt(r.get("ms"), ".3f") if r.get("ms") is not None else ("error" if r.get("error") else "-"),
                     _fmt(r.get("extra_peak_mib"), ".1f"), _fmt(r.get("gbps"), ".0f"),
                     _fmt(r.get("pct_of_copy"), ".0f"), _fmt(r.get("tflops"), ".0f")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    registry = load_all()
    parser = argparse.ArgumentParser(prog="specx-bench", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {sorted(registry)})")
    parser.add_argument("--quick", action="store_true", help="small shapes (the default without a GPU)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="results folder; files go to <out>/<device>/<name>.json (default: %(default)s)")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--measure-ceilings", action="store_true",
                        help="measure copy bandwidth and bf16 matmul rate instead of the recorded H200 figures")
    args = parser.parse_args(argv)

    unknown = [n for n in args.names if n not in registry]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {sorted(registry)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = args.quick or device.type != "cuda"
    ceilings = common.measure_ceilings(device) if args.measure_ceilings and device.type == "cuda" \
        else common.default_ceilings(device)
    header = common.results_header(device, ceilings)
    print(f"specx-bench on {header['device']} (torch {header['torch']}, CUDA {header['cuda']}), "
          f"{'quick' if quick else 'default'} shapes; ceilings: copy {ceilings.copy_tbps:.2f} TB/s, "
          f"bf16 {ceilings.bf16_tflops:.0f} TFLOP/s")

    for name in args.names or sorted(registry):
        bench = registry[name]
        cases = bench.cases(device, quick)
        records: list[dict] = []
        out_dir = args.out / common.device_slug(device)
        for case in tqdm(cases, desc=name, unit="case"):
            records.extend(bench.run_case(case, device, ceilings))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not args.no_save:  # after every case, so an interrupted run keeps what it measured
                path = common.write_results(out_dir, name, header, records)
        print(f"\n{bench.title}")
        print_table(records, bench.label_keys)
        if not args.no_save:
            print(f"wrote {path}")
            try:
                common.plot_records(out_dir / f"{name}.png", f"{bench.title} ({header['device']})", records,
                                    bench.label_keys)
                print(f"wrote {path.with_suffix('.png')}")
            except ImportError:
                print("matplotlib is missing: no plot (python -m specx.bench.report draws it later)")
    return 0
