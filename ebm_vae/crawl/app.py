"""`ebm-vae-crawl data.root=DIR`: the Hydra wrapper around `crawl(cfg)`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, open_dict

from ebm_vae.capsules import hydra_search_path
from ebm_vae.config import config_dir
from ebm_vae.crawl.crawl import crawl


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="crawl")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):  # --config-dir DIR brings DIR/capsule/*.yaml into the crawl
        cfg.capsule_search_path = list(dict.fromkeys([*cfg.capsule_search_path, *hydra_search_path()]))
    crawl(cfg)


if __name__ == "__main__":
    main()
