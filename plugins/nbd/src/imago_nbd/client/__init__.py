"""The NBD client: the ``nbd`` storage driver (:class:`Nbd`); NBD URIs are parsed by :mod:`imago_nbd.client.uri`."""

from .storage import Nbd

__all__ = ["Nbd"]
