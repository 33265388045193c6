"""The Physics Crawler: data tree -> `index/manifest.parquet` (+ statistics per capsule).

`scan` walks the tree, `manifest` holds the index format, `crawl` identifies files, `app` is
the `ebm-vae-crawl` command.
"""
