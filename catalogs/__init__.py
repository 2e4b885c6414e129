"""Offline catalogue stores (Gaia, and a PS1-like one for the alert context): prefetch into
LDAC tiles, run-time lookup and Gaia epoch propagation."""
import pipeline  # noqa: F401  (process hygiene before any astropy import)

from catalogs.epoch import (DEFAULT_PM_DISPERSION_MAS_YR, propagate_to_epoch, scamp_reference_table,
                    write_scamp_reference)
from catalogs.lookup import catalog_for_footprint, catalog_for_image
from catalogs.prefetch import GAIA_DR3_TABLE, PrefetchResult, prefetch_from_table, prefetch_from_tap
from catalogs.schema import (CATALOG_KINDS, GAIA, GAIA_COLUMNS, PS1, PS1_COLUMNS, CatalogError, CatalogKind,
                             as_catalog_table, as_gaia_table, catalog_kind, read_catalog_table, read_gaia_table)
from catalogs.sky import SkyBox, cone_region, field_region, footprint_region
from catalogs.store import DEFAULT_NSIDE, StoreInfo, read_store_info
from catalogs.tap import GAIA_TAP_URL, TapError

__all__ = [
    "CatalogError", "TapError", "CatalogKind", "CATALOG_KINDS", "GAIA", "PS1", "PS1_COLUMNS",
    "catalog_kind", "as_catalog_table", "read_catalog_table", "GAIA_COLUMNS", "GAIA_TAP_URL", "GAIA_DR3_TABLE", "DEFAULT_NSIDE",
    "DEFAULT_PM_DISPERSION_MAS_YR", "PrefetchResult", "StoreInfo", "SkyBox",
    "as_gaia_table", "read_gaia_table", "cone_region", "field_region", "footprint_region",
    "prefetch_from_table", "prefetch_from_tap", "read_store_info", "catalog_for_footprint", "catalog_for_image",
    "propagate_to_epoch", "scamp_reference_table", "write_scamp_reference",
]
