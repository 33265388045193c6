"""Benchmarks: `python scripts/bench.py SECTION [--json] [--gpu] [--quick]`.

SECTION is one of crawl, stream, train, export, study, scaling, fields, build, all. Each prints its figures
beside a baseline measured in the same run, with their ratio; `--json` prints one JSON object
keyed by section, then by format or case (see DESIGN.md, "Benchmark JSON").
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

SECTIONS = ["crawl", "stream", "train", "export", "study", "scaling", "fields", "build"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=SECTIONS + ["all"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA figures")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke runs, CI)")
    parser.add_argument("--workdir", default=None, help="where generated data goes (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--before", default=None, metavar="CHECKOUT",
                        help="fields: also score an earlier checkout's model on the same data")
    args = parser.parse_args(argv)

    sections = [s for s in SECTIONS if s != "scaling"] if args.section == "all" else [args.section]
    results = {}
    for name in sections:
        module = importlib.import_module(f"ebm_vae.bench.{name}")
        results[name] = module.run(args)
    payload = results if args.section == "all" else results[args.section]
    text = json.dumps(payload, indent=2, default=float)
    if args.json:
        print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
