"""The client's TLS context: X.509 certificates laid out as QEMU's ``tls-creds-x509`` directory."""

from __future__ import annotations

import os
import ssl

from imago import InvalidOptionError

__all__ = ["CA_CERT", "CLIENT_CERT", "CLIENT_KEY", "client_context"]

#: File names inside the certificate directory (QEMU's and nbdkit's layout).
CA_CERT = "ca-cert.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"


def client_context(directory: str | None, *, check_hostname: bool, verify_peer: bool = True) -> ssl.SSLContext:
    """An SSL context trusting *directory*'s CA and presenting its client certificate when there is one.

    Without *directory* the system's trusted CAs are used. ``InvalidOptionError`` (option
    ``tls_certificates``) when the directory or its files are missing or unusable.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify_peer:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = check_hostname
    try:
        if directory is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            return context
        if not os.path.isdir(directory):
            raise InvalidOptionError("tls_certificates", f"{directory!r} is not a directory")
        ca = os.path.join(directory, CA_CERT)
        if verify_peer:
            if not os.path.exists(ca):
                raise InvalidOptionError("tls_certificates", f"{directory!r} holds no {CA_CERT}")
            context.load_verify_locations(cafile=ca)
        cert = os.path.join(directory, CLIENT_CERT)
        key = os.path.join(directory, CLIENT_KEY)
        if os.path.exists(cert):
            context.load_cert_chain(cert, key if os.path.exists(key) else None)
    except (ssl.SSLError, OSError) as error:
        raise InvalidOptionError("tls_certificates", f"{directory!r}: {error}") from None
    return context
