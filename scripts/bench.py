"""Benchmarks: `python scripts/bench.py SECTION [SECTION ...] [--json] [--gpu] [--quick]`.

SECTION is one of crawl, stream, train, export, study, accuracy, scaling, fields, build, all. Each prints its figures
beside a baseline measured in the same run, with their ratio; `--json` prints one JSON object
keyed by section, then by format or case (see DESIGN.md, "Benchmark JSON"). `all` (every
section but the long accuracy, scaling and build runs) and any run of several sections end with
a one-screen summary: each figure, its baseline and their ratio, with the date, the machine and
its load (also under the JSON's "summary" key; the table goes to stderr with --json, so that
stdout stays one JSON object).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import sys
from typing import Any

SECTIONS = ["crawl", "stream", "train", "export", "study", "accuracy", "scaling", "fields", "build"]

# (figure, baseline) keys of the entries, in the order they are looked for
PAIRS = [
    ("stream_samples_per_s", "raw_samples_per_s"),
    ("cache_samples_per_s", "extract_samples_per_s"),
    ("pipeline_samples_per_s", "in_memory_samples_per_s"),
    ("bf16_samples_per_s", "fp32_samples_per_s"),
    ("files_per_s", "baseline_files_per_s"),
    ("energy_points_per_s", "forward_points_per_s"),
    ("seconds", "forward_seconds"),
    ("samples_per_s", "target_samples_per_s"),
]


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per entry that holds a figure and its baseline (or its target), with their ratio;
    entries that hold a ratio only (accuracy studies) give it alone."""
    rows = []
    for section, entries in results.items():
        for case, entry in entries.items():
            if not isinstance(entry, dict):
                continue
            pair = next(((f, b) for f, b in PAIRS if isinstance(entry.get(f), (int, float))
                         and isinstance(entry.get(b), (int, float))), None)
            if pair is None and "ratio" not in entry:
                continue
            figure, baseline = (entry[pair[0]], entry[pair[1]]) if pair else (None, None)
            ratio = entry.get("ratio", figure / baseline if pair and baseline else None)
            target = entry.get("target_ratio")
            rows.append({"section": section, "case": case, "figure": pair[0] if pair else "",
                         "value": figure, "baseline": pair[1] if pair else "", "baseline_value": baseline,
                         "ratio": ratio, "target_ratio": target})
            if "ratio_to_plain_read" in entry:  # the cache's second comparison
                rows.append({"section": section, "case": f"{case} (plain read)", "figure": pair[0],
                             "value": figure, "baseline": "plain_read_samples_per_s",
                             "baseline_value": entry["plain_read_samples_per_s"],
                             "ratio": entry["ratio_to_plain_read"],
                             "target_ratio": entry.get("target_ratio_to_plain_read")})
            if "ratio_to_litdata" in entry:
                rows.append({"section": section, "case": f"{case} (LitData)", "figure": pair[0],
                             "value": figure, "baseline": "litdata_samples_per_s",
                             "baseline_value": entry["litdata_samples_per_s"],
                             "ratio": entry["ratio_to_litdata"], "target_ratio": None})
    return rows


def machine() -> dict[str, Any]:
    """The date, the machine and its load: what a figure's conditions are."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["load_avg_1min"] = round(os.getloadavg()[0], 2)
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def format_summary(rows: list[dict[str, Any]], before: dict[str, Any], after: dict[str, Any],
                   command: str = "bench.py all") -> str:
    def number(x: Any) -> str:
        if x is None:
            return "-"
        return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"

    lines = [f"{command}, {after['date']} on {after['host']} ({after['cpu']}, {after['cpus']} CPUs"
             f"{', ' + after['gpu'] if 'gpu' in after else ''}); load average "
             f"{before.get('load_avg_1min', '?')} at the start, {after.get('load_avg_1min', '?')} at the end",
             f"{'section':8} {'case':32} {'figure':>14} {'baseline':>14} {'ratio':>7} {'target':>7}"]
    for r in rows:
        lines.append(f"{r['section']:8} {r['case'][:32]:32} {number(r['value']):>14} "
                     f"{number(r['baseline_value']):>14} {number(r['ratio']):>7} {number(r['target_ratio']):>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", nargs="+", choices=SECTIONS + ["all"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA figures")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke runs, CI)")
    parser.add_argument("--workdir", default=None, help="where generated data goes (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--before", default=None, metavar="CHECKOUT",
                        help="fields: also score an earlier checkout's model on the same data")
    args = parser.parse_args(argv)

    if "all" in args.section:
        sections = [s for s in SECTIONS if s not in ("scaling", "accuracy", "build")]
    else:
        sections = list(dict.fromkeys(args.section))
    start = machine()
    results = {}
    for name in sections:
        module = importlib.import_module(f"ebm_vae.bench.{name}")
        results[name] = module.run(args)
    summarised = len(sections) > 1
    payload: dict[str, Any] = results if summarised else results[sections[0]]
    table = None
    if summarised:
        end = machine()
        rows = summary_rows(results)
        payload = {**results, "summary": {"machine": end, "load_avg_1min_start": start.get("load_avg_1min"),
                                          "rows": rows}}
        table = format_summary(rows, start, end, "bench.py " + " ".join(args.section))
    text = json.dumps(payload, indent=2, default=float)
    if args.json:
        print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    if table is not None:
        print(table, file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
