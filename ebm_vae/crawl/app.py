"""`ebm-vae-crawl data.root=DIR`: the console script around `crawl(cfg)` (see ebm_vae.cli)."""

from __future__ import annotations

from omegaconf import DictConfig

from ebm_vae.cli import App


def _crawl(cfg: DictConfig) -> None:
    from ebm_vae.crawl.crawl import crawl  # the readers: imported on use (a fast --help)

    crawl(cfg)


main = App(
    name="ebm-vae-crawl", config_name="crawl", task=_crawl,
    summary="index a data tree: sort its files into capsules (every capsule it sees, built-in "
            "and --config-dir ones) into index/manifest.parquet, then the statistics of each "
            "capsule into index/<capsule>/stats.json, under paths.root",
    usage=("data.root=DIR [paths.root=DIR] [KEY=VALUE ...] [--config-dir MYCONF]",),
    choices=("capsule",),
    choices_title="Capsules it sorts files into (every one, built-in and --config-dir):",
    overrides=(
        ("data.root=DIR", "the data tree (never written to); a re-crawl inspects only changed files"),
        ("paths.root=DIR", "where index/ goes (default: the current folder); one data tree per index"),
        ("crawl.replace_index=true", "replace an index of another data tree (its statistics go too)"),
        ("crawl.workers=N", "processes inspecting files (default: one per CPU)"),
        ("crawl.stats=false", "the index only, no statistics pass"),
        ("crawl.file_timeout_s=S", "a file whose reader takes longer gets an error row"),
    ),
).main


if __name__ == "__main__":
    main()
