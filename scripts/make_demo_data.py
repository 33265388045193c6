"""Generate the demo data tree: `python scripts/make_demo_data.py OUT_DIR [--scale S] [--seed N]`.

The default tree (scale 1) is ~100 MB and takes ~10 CPU-seconds: fusion HDF5 in the Well's and
a plain layout (~2,900 snapshots of 3 x 16 x 16 on the plane), wafer NetCDF in K and degC
(~3,600 maps of 32 x 32), grid CSV/Parquet, plus decoys and faulty files.
`--scale` multiplies sample counts (and files, past the per-file caps) up to GBs.
`--many-small N` writes N tiny files instead (the crawl benchmark's tree).
`--config-dir DIR` also writes the `shots` user capsule (DIR/capsule/shots.yaml) and its plasma
shot log: pass the same `--config-dir DIR` to ebm-vae-crawl, -train and -export.
Regenerating into the same folder overwrites the files; the content depends only on the seed.
"""

from __future__ import annotations

import argparse
import time

from ebm_vae.demo import make_demo_tree, make_many_small_files


def _print_summary(summary: dict, seconds: float) -> None:
    print(f"{summary['root']}: {summary['total_files']} files, "
          f"{summary['total_bytes'] / 1e6:.1f} MB in {seconds:.1f} s")
    print(f"  {'capsule':<8} {'files':>7} {'MB':>10}")
    for capsule, counts in summary["capsules"].items():
        print(f"  {capsule:<8} {counts['files']:>7} {counts['bytes'] / 1e6:>10.2f}")
    for path in summary["skipped"]:
        print(f"  hidden (a crawl skips it): {path}")
    for link, target in summary["symlinks"].items():
        print(f"  symlink loop: {link} -> {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="root of the tree to write (created if missing)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies sample counts (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config-dir", default=None, metavar="DIR",
                        help="also write the `shots` user capsule here and its shot log into the tree")
    parser.add_argument("--many-small", type=int, metavar="N", default=None,
                        help="write N tiny files (crawl benchmark) instead of the demo tree")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")

    start = time.perf_counter()
    if args.many_small is not None:
        summary = make_many_small_files(args.out_dir, n_files=args.many_small, seed=args.seed)
    else:
        summary = make_demo_tree(args.out_dir, scale=args.scale, seed=args.seed, config_dir=args.config_dir)
    _print_summary(summary, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
