"""The state extractors. Adding a kind of state = one module with an `Extractor`, listed here."""

from __future__ import annotations

from ebm_vae.data.extractors.base import ExtractError, Extractor, FilePlan, StateInfo
from ebm_vae.data.extractors.fusion import FusionExtractor
from ebm_vae.data.extractors.grid import GridExtractor
from ebm_vae.data.extractors.table import TableExtractor
from ebm_vae.data.extractors.wafer import WaferExtractor

EXTRACTORS: dict[str, type[Extractor]] = {
    e.name: e for e in (FusionExtractor, WaferExtractor, GridExtractor, TableExtractor)
}

__all__ = ["EXTRACTORS", "ExtractError", "Extractor", "FilePlan", "StateInfo"]
