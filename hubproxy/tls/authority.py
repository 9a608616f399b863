"""The interception CA: DIR/ca.pem and DIR/ca.key, made by `init`, read back by `load`.

Invariants: the CA is name-constrained (nameConstraints, critical) to DNS subtrees of the hosts
hubproxy intercepts, and excludes every IP address, so its key, even leaked, cannot speak for any
other site; it can sign leaves and nothing below them (basicConstraints critical CA:TRUE
pathlen 0; keyUsage critical keyCertSign+cRLSign only). The key is ECDSA P-256, written 0600 from
its first byte and never overwritten unless `force` is given. `load` accepts only a CA made this
way (a CA, name-constrained, with a subjectKeyIdentifier, and the key that matches it); every
refusal is one CAError line naming the file at fault.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import names
from .files import PRIVATE, PUBLIC, write_new
from .names import INTERCEPTED_HOSTS

__all__ = ["INTERCEPTED_HOSTS", "Authority", "CAError", "init", "load", "load_certificate"]

CERT_NAME = "ca.pem"
KEY_NAME = "ca.key"
CA_LIFETIME = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(days=1)  # notBefore this far back: a client whose clock is behind still trusts it
EVERY_IP_ADDRESS = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
_CN_PREFIX = "hubproxy interception CA ("
_CN_MAX = 64  # X.509's upper bound for a common name


class CAError(ValueError):
    """The CA could not be made or used; the message is one line naming the file at fault."""


@dataclass(frozen=True)
class Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    permitted: tuple[str, ...]  # the DNS subtrees its nameConstraints permit
    directory: Path

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_identifier(self) -> x509.SubjectKeyIdentifier:
        return self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    def permits(self, host: str) -> bool:
        """Whether `host` (normalized) lies inside the CA's name constraints."""
        return any(names.covers(constraint, host) for constraint in self.permitted)


def paths(ca_dir: Path) -> tuple[Path, Path]:
    """(certificate, key) in `ca_dir`."""
    return Path(ca_dir) / CERT_NAME, Path(ca_dir) / KEY_NAME


def init(ca_dir: Path, hosts: Iterable[str] = INTERCEPTED_HOSTS, force: bool = False) -> Authority:
    """Make a CA constrained to `hosts` and write it to `ca_dir`; refuses to overwrite one unless `force`."""
    try:
        permitted = names.subtrees(hosts)
    except names.HostError as e:
        raise CAError(str(e)) from None
    cert_path, key_path = paths(ca_dir)
    if not force:
        for path in (key_path, cert_path):
            if path.exists():
                raise CAError(f"{path} already exists; not overwriting a CA (--force replaces it)")
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _build(key, permitted)
    _make_dir(Path(ca_dir))
    _write(key_path, _private_pem(key), PRIVATE, force)
    try:
        _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), PUBLIC, force)
    except CAError:
        if not force:
            key_path.unlink(missing_ok=True)  # no key without its certificate
        raise
    return Authority(certificate, key, permitted, Path(ca_dir))


def load(ca_dir: Path) -> Authority:
    """The CA in `ca_dir`, checked; see the module's invariants."""
    cert_path, key_path = paths(ca_dir)
    certificate = load_certificate(ca_dir)
    permitted = _checked_constraints(certificate, cert_path)
    key_pem = _read(key_path, ca_dir)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CAError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(certificate.public_key()):
        raise CAError(f"{key_path} does not match {cert_path}")
    return Authority(certificate, key, permitted, Path(ca_dir))


def load_certificate(ca_dir: Path) -> x509.Certificate:
    """The CA's certificate alone, checked as `load` checks it: all a trust bundle needs, readable
    by users who may not read the key."""
    cert_path, _ = paths(ca_dir)
    pem = _read(cert_path, ca_dir)
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise CAError(f"{cert_path} is not a PEM certificate") from None
    _checked_constraints(certificate, cert_path)
    return certificate


def _build(key: ec.EllipticCurvePrivateKey, permitted: tuple[str, ...]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _common_name()),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hubproxy")])
    constraints = x509.NameConstraints(permitted_subtrees=[x509.DNSName(host) for host in permitted],
                                       excluded_subtrees=[x509.IPAddress(net) for net in EVERY_IP_ADDRESS])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(constraints, critical=True)
        .sign(key, hashes.SHA256())
    )


def _common_name() -> str:
    """'hubproxy interception CA (<this machine>)', the machine's name shortened to fit."""
    room = _CN_MAX - len(_CN_PREFIX) - 1
    return f"{_CN_PREFIX}{(socket.gethostname() or 'unknown')[:room]})"


def _checked_constraints(certificate: x509.Certificate, cert_path: Path) -> tuple[str, ...]:
    """The permitted DNS subtrees of a CA hubproxy made, or CAError saying what it lacks."""
    extensions = certificate.extensions
    try:
        basic = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is None or not basic.ca:
        raise CAError(f"{cert_path} is not a CA certificate (no basicConstraints CA:TRUE)")
    for kind, name in ((x509.NameConstraints, "nameConstraints"), (x509.SubjectKeyIdentifier, "subjectKeyIdentifier")):
        try:
            extensions.get_extension_for_class(kind)
        except x509.ExtensionNotFound:
            raise CAError(f"{cert_path} has no {name}; use a CA made by hubproxy ca init") from None
    constraints = extensions.get_extension_for_class(x509.NameConstraints).value
    permitted = tuple(n.value for n in constraints.permitted_subtrees or () if isinstance(n, x509.DNSName))
    if not permitted:
        raise CAError(f"{cert_path} permits no DNS names; use a CA made by hubproxy ca init")
    return permitted


def _read(path: Path, ca_dir: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CAError(f"{path} does not exist; make the CA with: hubproxy ca init --ca-dir {ca_dir}") from None
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from None


def _write(path: Path, data: bytes, mode: int, replace: bool) -> None:
    try:
        write_new(path, data, mode=mode, replace=replace)
    except FileExistsError:
        raise CAError(f"{path} already exists; not overwriting a CA (--force replaces it)") from None
    except OSError as e:
        raise CAError(f"cannot write {path}: {e.strerror}") from None


def _make_dir(ca_dir: Path) -> None:
    try:
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CAError(f"cannot create CA dir {ca_dir}: {e.strerror}") from None
    if not ca_dir.is_dir():
        raise CAError(f"CA dir {ca_dir} is not a directory")


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
