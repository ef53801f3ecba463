#!/usr/bin/env python3
"""medians.py: the median of each figure of every point that
second-round.sh measured, one line a point, from DIR/<point>.jsonl (one
`pgrelay-bench --json` object a run). A run marked NOISY is left out and
counted; a run that lost or duplicated an event is shown as such.

    python3 tests/bench/medians.py bench-results
"""
import json
import statistics
import sys
from pathlib import Path

# (label, path into the JSON object, scale, format) of each figure shown.
LOAD = [
    ("deliveries/s", "deliveries_per_s", 1, "{:,.0f}"),
    ("p50 ms", "latency_us.p50", 1e-3, "{:.2f}"),
    ("p99 ms", "latency_us.p99", 1e-3, "{:.2f}"),
    ("pgrelay us/delivery", "cpu_per_delivery_us.pgrelay", 1, "{:.3f}"),
    ("bench us/delivery", "cpu_per_delivery_us.bench", 1, "{:.3f}"),
    ("bench/pgrelay", "cpu_per_delivery_us.bench_over_pgrelay", 1, "{:.2f}"),
    ("RSS connected MiB", "pgrelay.rss_connected_kib", 1 / 1024, "{:.1f}"),
    ("peak RSS MiB", "pgrelay.peak_rss_kib", 1 / 1024, "{:.1f}"),
]
FIGURES = {
    "load": LOAD,
    "connect-rate": [
        ("sockets/s", "sockets_per_s", 1, "{:,.0f}"),
        ("hello p99 ms", "time_to_hello_us.p99", 1e-3, "{:.1f}"),
        ("failed", "failed", 1, "{:.0f}"),
    ],
    "resume-storm": [
        ("caught up s", "caught_up_s", 1, "{:.2f}"),
        ("replay rows", "replay_rows", 1, "{:.0f}"),
        ("1013 closes", "closes.1013", 1, "{:.0f}"),
        ("retries", "retries", 1, "{:.0f}"),
        ("peak RSS MiB", "pgrelay_peak_rss_kib", 1 / 1024, "{:.1f}"),
    ],
}


def get(run, path):
    for key in path.split("."):
        if not isinstance(run, dict) or key not in run:
            return 0.0
        run = run[key]
    return float(run)


def main(directory):
    for jsonl in sorted(Path(directory).glob("*.jsonl")):
        runs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        quiet = [r for r in runs if not r.get("noisy")]
        if not quiet:
            print(f"{jsonl.stem}: no quiet run ({len(runs)} noisy)")
            continue
        scenario = quiet[0].get("scenario", "load")
        shown = []
        for label, path, scale, fmt in FIGURES.get(scenario, LOAD):
            values = [get(r, path) * scale for r in quiet]
            shown.append(f"{label} {fmt.format(statistics.median(values))}")
        lossy = sum(1 for r in quiet if r.get("lost", 0) or r.get("duplicated", 0))
        noisy = len(runs) - len(quiet)
        tail = f"; {lossy} with lost or duplicated" if lossy else ""
        tail += f"; {noisy} NOISY left out" if noisy else ""
        print(f"{jsonl.stem} (median of {len(quiet)}): " + ", ".join(shown) + tail)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
