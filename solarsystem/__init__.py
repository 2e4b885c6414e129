"""The offline solar-system wing: known minor planets for the alerts' ``ssnamenr``,
``ssdistnr`` and ``ssmagnr``.

- :mod:`solarsystem.mpcorb`: the MPC's MPCORB fixed-column format (packed epochs and
  designations), read and written.
- :mod:`solarsystem.orbits`: osculating elements to heliocentric states and two-body
  propagation with skyfield, the observer (DE421 + the site) and light-time corrected
  astrometric positions, H,G magnitudes.
- :mod:`solarsystem.store`: the orbit store (``skydiff solarsystem ingest``), one binary
  file of every object's elements.
- :mod:`solarsystem.night`: the per-night preparation (``skydiff solarsystem prepare``):
  every orbit's exact state at the night's middle, indexed on the sky; and the per-quadrant
  lookup of the objects on a footprint at an exposure's mid-time.

Nothing here reaches the network: the planetary ephemeris (DE421) and the timescale ship
with the installed packages (``skyfield-data``, skyfield's builtin leap seconds).
"""
