"""Forced photometry on the difference images: the archive, the PSF fit and its tables.

``archive.py`` keeps every difference image with what forced photometry needs and indexes it
(the file edge and the index); ``measure.py`` is the pure PSF fit on difference-image stamps;
``lightcurves.py`` turns archive epochs and sky positions into the ZTF forced-photometry
service's rows and the alerts' ``fp_hist`` records.
"""
