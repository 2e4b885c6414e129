"""Survey fields: an id and a centre (no astropy here: the command line lists the defaults in
its help without loading the simulator)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_FIELDS", "Field"]


@dataclass(frozen=True)
class Field:
    """A survey field: id and centre (deg)."""

    fieldid: int
    ra: float
    dec: float


#: Fields the demo uses: two fields observable on a March night from the site.
DEFAULT_FIELDS = (Field(600, 150.0, 33.0), Field(750, 205.0, 40.0))
