"""TLS for the server: X.509 credentials from a directory, and qemu's ``--object`` syntax.

A credentials directory holds what QEMU's ``tls-creds-x509`` object reads: ``server-cert.pem``
and ``server-key.pem`` (the server's certificate and key) and ``ca-cert.pem`` (the authority
client certificates must chain to). With *verify_peer* (QEMU's default) clients must present a
certificate signed by that authority.
"""

from __future__ import annotations

import os
import ssl

import attrs

from imago import InvalidOptionError

__all__ = ["TlsCredentials", "parse_object", "server_context"]

_TRUE = frozenset({"on", "yes", "true", "y"})
_FALSE = frozenset({"off", "no", "false", "n"})


@attrs.frozen(kw_only=True)
class TlsCredentials:
    """An X.509 credentials object: its id, directory, endpoint and whether peers are verified."""

    id: str
    directory: str
    endpoint: str = "server"
    verify_peer: bool = True


def parse_object(text: str) -> TlsCredentials:
    """Parse ``--object tls-creds-x509,id=ID,dir=DIR[,endpoint=server][,verify-peer=on|off]``.

    Raises :class:`~imago.InvalidOptionError` naming ``--object`` for other object types,
    unknown or missing properties, and bad values.
    """
    fields = [field for field in text.split(",")]
    kind = fields[0]
    if kind.startswith("qom-type="):
        kind = kind.removeprefix("qom-type=")
    if kind != "tls-creds-x509":
        raise InvalidOptionError("--object", f"object type {kind!r} is not supported (only tls-creds-x509)")
    properties: dict[str, str] = {}
    for field in fields[1:]:
        key, equals, value = field.partition("=")
        if not equals:
            raise InvalidOptionError("--object", f"property {field!r} has no value")
        if key not in ("id", "dir", "endpoint", "verify-peer"):
            raise InvalidOptionError("--object", f"tls-creds-x509 has no property {key!r}")
        properties[key] = value
    for required in ("id", "dir"):
        if not properties.get(required):
            raise InvalidOptionError("--object", f"tls-creds-x509 needs {required}=")
    endpoint = properties.get("endpoint", "client")
    if endpoint not in ("server", "client"):
        raise InvalidOptionError("--object", f"endpoint must be server or client, not {endpoint!r}")
    verify = properties.get("verify-peer", "on").lower()
    if verify not in _TRUE | _FALSE:
        raise InvalidOptionError("--object", f"verify-peer must be on or off, not {verify!r}")
    return TlsCredentials(
        id=properties["id"], directory=properties["dir"], endpoint=endpoint, verify_peer=verify in _TRUE
    )


def server_context(directory: str | os.PathLike[str], *, verify_peer: bool = True) -> ssl.SSLContext:
    """A server :class:`ssl.SSLContext` from an X.509 credentials *directory* (see the module).

    Raises :class:`~imago.InvalidOptionError` (option ``--tls-creds``) naming a missing or
    unreadable file.
    """
    folder = os.fspath(directory)
    certificate = os.path.join(folder, "server-cert.pem")
    key = os.path.join(folder, "server-key.pem")
    authority = os.path.join(folder, "ca-cert.pem")
    needed = [certificate, key] + ([authority] if verify_peer else [])
    for path in needed:
        if not os.path.isfile(path):
            raise InvalidOptionError("--tls-creds", f"{path}: no such file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, key)
        if verify_peer:
            context.load_verify_locations(authority)
            context.verify_mode = ssl.CERT_REQUIRED
        else:
            context.verify_mode = ssl.CERT_NONE
    except (ssl.SSLError, OSError) as error:
        raise InvalidOptionError("--tls-creds", f"{folder}: {error}") from None
    return context
