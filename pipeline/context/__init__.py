"""Context of the candidates from prefetched knowledge of the sky: catalogue neighbours
(:mod:`pipeline.context.catalogs`, PS1-like and Gaia), added to the subtraction's
candidate table before its products are written, so the alert packets carry them."""
