#!/usr/bin/env python3
"""medians.py: the median of each figure of every point that
second-round.sh measured, one line a point, from DIR/<point>.jsonl (one
`pgrelay-bench --json` object a run). Runs refused for a busy machine
(second-round.sh writes `{"refused": true}` for them), runs that ended
without a report (`{"error": STATUS}`) and runs marked NOISY are left out
and counted; runs that did not pass (lost, duplicated or
misrouted events, failed sockets, clients left behind) are counted and
named. A figure a run did not report is left out of its median, and said.

    python3 tests/bench/medians.py bench-results
"""
import json
import statistics
import sys
from pathlib import Path

# (label, path into the JSON object, scale, format[, value when absent]) of
# each figure shown. "server" is pgrelay, or the plain broadcaster of the
# ideal-* points (the load report's JSON keeps its keys for both).
LOAD = [
    ("deliveries/s", "deliveries_per_s", 1, "{:,.0f}"),
    ("p50 ms", "latency_us.p50", 1e-3, "{:.2f}"),
    ("p99 ms", "latency_us.p99", 1e-3, "{:.2f}"),
    ("server us/delivery", "cpu_per_delivery_us.pgrelay", 1, "{:.3f}"),
    ("bench us/delivery", "cpu_per_delivery_us.bench", 1, "{:.3f}"),
    ("bench/server", "cpu_per_delivery_us.bench_over_pgrelay", 1, "{:.2f}"),
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
        # Closes by code: a code nobody got is absent, that is 0.
        ("1013 closes", "closes.1013", 1, "{:.0f}", 0.0),
        ("retries", "retries", 1, "{:.0f}"),
        ("peak RSS MiB", "pgrelay_peak_rss_kib", 1 / 1024, "{:.1f}"),
    ],
}


def get(run, path):
    """The figure at `path`, or None when the run has none."""
    for key in path.split("."):
        if not isinstance(run, dict) or run.get(key) is None:
            return None
        run = run[key]
    return float(run)


def median(values, fmt):
    present = [v for v in values if v is not None]
    if not present:
        return "n/a"
    shown = fmt.format(statistics.median(present))
    missing = len(values) - len(present)
    return shown + (f" ({missing} without)" if missing else "")


def main(directory):
    for jsonl in sorted(Path(directory).glob("*.jsonl")):
        runs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        refused = sum(1 for r in runs if r.get("refused"))
        errors = [r["error"] for r in runs if "error" in r]
        runs = [r for r in runs if not r.get("refused") and "error" not in r]
        quiet = [r for r in runs if not r.get("noisy")]
        if not quiet:
            print(f"{jsonl.stem}: no quiet run ({len(runs)} noisy, {refused} refused, "
                  f"{len(errors)} ended without a report)")
            continue
        scenario = quiet[0].get("scenario", "load")
        shown = []
        for label, path, scale, fmt, *absent in FIGURES.get(scenario, LOAD):
            values = [get(r, path) for r in quiet]
            values = [absent[0] if v is None and absent else v for v in values]
            values = [None if v is None else v * scale for v in values]
            shown.append(f"{label} {median(values, fmt)}")
        failed = sum(1 for r in quiet if not r.get("passed", False))
        lossy = sum(1 for r in quiet if r.get("lost") or r.get("duplicated"))
        noisy = len(runs) - len(quiet)
        tail = f"; {failed} did not pass" if failed else ""
        tail += f" ({lossy} lost or duplicated events)" if lossy else ""
        tail += f"; {noisy} NOISY left out" if noisy else ""
        tail += f"; {refused} refused (busy machine)" if refused else ""
        tail += f"; {len(errors)} ended without a report (exit {errors})" if errors else ""
        print(f"{jsonl.stem} (median of {len(quiet)}): " + ", ".join(shown) + tail)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
