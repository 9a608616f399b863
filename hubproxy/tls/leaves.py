"""Leaf certificates for intercepted hosts, and the server-side ssl contexts that present them.

Invariants: a leaf names exactly one host (SAN DNS:host, CN host) inside the CA's name
constraints; any other name is refused with a one-line HostError and never signed. Each leaf has
its own fresh P-256 key, is a server certificate only (keyUsage critical digitalSignature,
extendedKeyUsage serverAuth, CA:FALSE), points at its CA (authorityKeyIdentifier = the CA's
subjectKeyIdentifier) and spans at most 200 days, starting a day back for clock skew: it passes
OpenSSL's VERIFY_X509_STRICT. Leaves are cached in memory per host and re-issued once less than a
third of their span is left. Key material never rests on disk: it reaches OpenSSL through an
anonymous in-memory file (memfd) or, where there is none, a 0600 temp file that holds the key
only encrypted, deleted as soon as it is loaded.
"""

from __future__ import annotations

import datetime
import os
import secrets
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import names
from .authority import CLOCK_SKEW, Authority

DEFAULT_LIFETIME = datetime.timedelta(days=90)
MAX_LIFETIME = datetime.timedelta(days=200)
MAX_CACHED = 1024  # hosts; past it the longest-held leaf is dropped (and re-issued when asked again)
_CN_MAX = 64
_PROC_FDS = Path("/proc/self/fd")


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Leaf:
    host: str
    certificate: x509.Certificate
    context: ssl.SSLContext  # server side, TLS >= 1.2, presenting `certificate`

    def due(self, now: datetime.datetime) -> bool:
        """Whether less than a third of the leaf's span is left at `now`."""
        start, end = self.certificate.not_valid_before_utc, self.certificate.not_valid_after_utc
        return end - now < (end - start) / 3


class Leaves:
    """The leaves of one CA, issued on first use per host; safe to call from several threads."""

    def __init__(self, ca: Authority, *, lifetime: datetime.timedelta = DEFAULT_LIFETIME,
                 clock: Callable[[], datetime.datetime] = _utc_now):
        if not CLOCK_SKEW < lifetime <= MAX_LIFETIME:
            raise ValueError(f"a leaf lifetime must be over {CLOCK_SKEW.days} day and at most 200 days, "
                             f"not {lifetime}")
        self._ca, self._lifetime, self._clock = ca, lifetime, clock
        self._leaves: dict[str, Leaf] = {}
        self._lock = threading.Lock()

    def context_for(self, host: str) -> ssl.SSLContext:
        """A server ssl context presenting a valid leaf for `host`, or HostError (one line)."""
        return self.leaf_for(host).context

    def leaf_for(self, host: str) -> Leaf:
        name = self._signable(host)
        with self._lock:
            now = self._clock()
            leaf = self._leaves.get(name)
            if leaf is None or leaf.due(now):
                leaf = self._issue(name, now)
                self._leaves.pop(name, None)
                if len(self._leaves) >= MAX_CACHED:
                    self._leaves.pop(next(iter(self._leaves)))
                self._leaves[name] = leaf
            return leaf

    def _signable(self, host: str) -> str:
        name = names.normalized(host)
        if not self._ca.permits(name):
            raise names.HostError(f"{host!r} is outside the CA's name constraints "
                                  f"({', '.join(self._ca.permitted)}); not signing a leaf for it")
        return name

    def _issue(self, host: str, now: datetime.datetime) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = sign_leaf(self._ca, host, key, now - CLOCK_SKEW, self._lifetime)
        return Leaf(host, certificate, _server_context(certificate, key))


def sign_leaf(ca: Authority, host: str, key: ec.EllipticCurvePrivateKey, start: datetime.datetime,
              lifetime: datetime.timedelta) -> x509.Certificate:
    """The CA's leaf for `host` (checked against its constraints by the caller) and `key`'s public half."""
    # A name too long for a CN goes in the SAN alone; RFC 5280 then wants the SAN critical.
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= _CN_MAX else []
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=not subject)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca.key_identifier),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


def _server_context(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    if hasattr(os, "memfd_create") and _PROC_FDS.is_dir():
        _load_from_memory(context, cert_pem, key)
    else:
        _load_from_encrypted_temp_file(context, cert_pem, key)
    return context


def _load_from_memory(context: ssl.SSLContext, cert_pem: bytes, key: ec.EllipticCurvePrivateKey) -> None:
    """load_cert_chain wants a path: give it one to an anonymous file that lives only in memory."""
    fd = os.memfd_create("hubproxy-leaf", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(cert_pem + _key_pem(key, serialization.NoEncryption()))
        context.load_cert_chain(_PROC_FDS / str(fd))
    finally:
        os.close(fd)


def _load_from_encrypted_temp_file(context: ssl.SSLContext, cert_pem: bytes,
                                   key: ec.EllipticCurvePrivateKey) -> None:
    """Where memfd is missing: a private temp file (0600, O_EXCL), the key in it encrypted under a
    password that only ever lives in this process, removed once loaded."""
    password = secrets.token_bytes(32)
    with tempfile.NamedTemporaryFile("wb", prefix="hubproxy-leaf-", suffix=".pem") as f:
        f.write(cert_pem + _key_pem(key, serialization.BestAvailableEncryption(password)))
        f.flush()
        context.load_cert_chain(f.name, password=password)


def _key_pem(key: ec.EllipticCurvePrivateKey, encryption: serialization.KeySerializationEncryption) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
