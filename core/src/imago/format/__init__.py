"""The format layer.

``driver`` (the FormatDriver interface) and ``builder`` (opening and creating images), ``mapping``
(where data lives), ``capabilities`` (what a driver can do beyond reading), ``names`` (which file
names images may record), ``gates`` (which files an image may make us open), ``access`` (the I/O
engine and its synchronous face) and ``extents`` (the engine's mapping cache). Their public names
are exported from :mod:`imago`.
"""
