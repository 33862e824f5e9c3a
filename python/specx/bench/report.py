"""Regenerates the plots and the README's benchmark tables from the committed results JSON.

    python -m specx.bench.report [--results benchmarks/results] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specx.bench import common
from specx.bench.registry import load_all

START, END = "<!-- bench-tables:start -->", "<!-- bench-tables:end -->"


def _cell(ms) -> str:
    return "-" if ms is None else (f"{ms * 1e3:.1f} µs" if ms < 0.1 else f"{ms:.3f}")


def table(results: dict, label_keys: list[str]) -> str:
    """One markdown table: a row per case, a column per implementation (ms), specx's speedup
    over the fastest peer timed per call, and specx's share of the bandwidth or FLOP ceiling."""
    records = results["records"]
    impls = list(dict.fromkeys(r["impl"] for r in records))
    cases = list(dict.fromkeys(common.record_label(r, label_keys) for r in records))
    by = {(common.record_label(r, label_keys), r["impl"]): r for r in records}
    # specx is compared with the peers timed the same way (per call, not as CUDA-graph replays).
    peers = [i for i in impls if not i.startswith("specx") and "_graph" not in i]
    head = ["case"] + [f"{i} (ms)" for i in impls] + ["specx vs best peer", "specx % of ceiling"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        ours = by.get((case, "specx"), {})
        peer_ms = [by[(case, p)]["ms"] for p in peers if (case, p) in by and by[(case, p)].get("ms")]
        speedup = f"{min(peer_ms) / ours['ms']:.1f}x" if peer_ms and ours.get("ms") else "-"
        pct = ours.get("pct_of_copy", ours.get("pct_of_peak"))
        cells = [case] + [_cell(by.get((case, i), {}).get("ms")) for i in impls]
        cells += [speedup, f"{pct:.0f}%" if pct is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specx.bench.report", description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    registry = load_all()
    sections = []
    for path in sorted(args.results.glob("*/*.json")):
        results = json.loads(path.read_text())
        bench = registry.get(path.stem)
        keys = bench.label_keys if bench else sorted({k for r in results["records"] for k in r["shape"]})
        title = bench.title if bench else path.stem
        common.plot_records(path.with_suffix(".png"), f"{title} ({results['device']})", results["records"], keys)
        sections.append(f"#### {title}: {results['device']}\n\n"
                        f"torch {results['torch']}, CUDA {results['cuda']}, {results['date']}, commit "
                        f"{results['git']}; [JSON]({path.as_posix()}), plot:\n\n"
                        f"![{path.stem}]({path.with_suffix('.png').as_posix()})\n\n{table(results, keys)}\n")
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    args.readme.write_text(head + START + "\n" + "\n".join(sections) + END + tail)
    print(f"updated {args.readme} with {len(sections)} result file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
