"""NBD URIs (the NBD project's ``doc/uri.md``): where an export is and how to reach it."""

from __future__ import annotations

import urllib.parse

import attrs

from imago import InvalidOptionError

from ..constants import URI_SCHEMES as SCHEMES

__all__ = ["DEFAULT_PORT", "SCHEMES", "NbdAddress", "parse_uri"]

#: The IANA port of NBD.
DEFAULT_PORT = 10809
_QUERY_KEYS = frozenset({"socket", "tls-certificates", "tls-hostname", "tls-verify-peer", "tls-type"})


@attrs.frozen(kw_only=True)
class NbdAddress:
    """A parsed NBD URI: the transport (TCP *host*/*port* or Unix *socket_path*), the *export* and TLS settings."""

    uri: str
    tls: bool
    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket_path: str | None = None
    #: A directory holding ``ca-cert.pem`` and optionally ``client-cert.pem``/``client-key.pem``.
    tls_certificates: str | None = None
    #: The name the server's certificate must carry (default: *host*; none over a Unix socket).
    tls_hostname: str | None = None
    tls_verify_peer: bool = True


def _bad(uri: str, problem: str) -> InvalidOptionError:
    return InvalidOptionError("filename", f"NBD URI {uri!r}: {problem}")


def parse_uri(uri: str) -> NbdAddress:
    """Parse *uri*; :class:`~imago.InvalidOptionError` naming the URI and what is wrong with it."""
    if not isinstance(uri, str):
        raise InvalidOptionError("filename", f"an NBD URI must be a string, not {uri!r}")
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as error:
        raise _bad(uri, str(error)) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not uri[len(scheme) :].startswith("://"):
        raise _bad(uri, f"the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if parts.fragment:
        raise _bad(uri, "a fragment (#...) has no meaning")
    if parts.username is not None or parts.password is not None:
        raise _bad(uri, "user names (TLS-PSK) are not supported")
    try:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as error:
        raise _bad(uri, f"malformed query: {error}") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            raise _bad(uri, f"unknown query parameter {key!r}")
        if key in query:
            raise _bad(uri, f"query parameter {key!r} given twice")
        query[key] = value
    path = urllib.parse.unquote(parts.path, errors="strict") if parts.path else ""
    if path and not path.startswith("/"):
        raise _bad(uri, "the export name must follow a '/'")
    export = path[1:]
    if "\0" in export:
        raise _bad(uri, "the export name contains a NUL character")
    tls = scheme.startswith("nbds")
    unix = scheme.endswith("+unix")
    tls_keys = {key for key in query if key.startswith("tls-")}
    if tls_keys and not tls:
        raise _bad(uri, f"{', '.join(sorted(tls_keys))} needs a TLS scheme (nbds:// or nbds+unix://)")
    if query.get("tls-type", "x509") != "x509":
        raise _bad(uri, f"tls-type {query['tls-type']!r} is not supported (only x509)")
    verify = query.get("tls-verify-peer", "1")
    if verify not in ("0", "1"):
        raise _bad(uri, f"tls-verify-peer must be 0 or 1, not {verify!r}")
    certificates = query.get("tls-certificates") or None
    hostname = query.get("tls-hostname") or None
    if unix:
        socket_path = query.get("socket")
        if not socket_path:
            raise _bad(uri, "nbd+unix:// needs the socket=PATH query parameter")
        if parts.netloc:
            raise _bad(uri, f"a Unix socket URI has no host ({parts.netloc!r}); write {scheme}:///EXPORT?socket=PATH")
        return NbdAddress(
            uri=uri,
            tls=tls,
            export=export,
            socket_path=socket_path,
            tls_certificates=certificates,
            tls_hostname=hostname,
            tls_verify_peer=verify == "1",
        )
    if "socket" in query:
        raise _bad(uri, f"socket= is for nbd+unix:// URIs, not {scheme}://")
    if not parts.hostname:
        raise _bad(uri, "a TCP URI needs a host (nbd://HOST[:PORT]/EXPORT)")
    if port == 0:
        raise _bad(uri, "port 0 is not a port to connect to")
    return NbdAddress(
        uri=uri,
        tls=tls,
        export=export,
        host=parts.hostname,
        port=DEFAULT_PORT if port is None else port,
        tls_certificates=certificates,
        tls_hostname=hostname or parts.hostname,
        tls_verify_peer=verify == "1",
    )
