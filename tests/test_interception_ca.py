"""The interception CA: `hubproxy ca init` writes a name-constrained CA whose key only its owner can
read and that is never overwritten by accident; leaves for the hub hosts pass a strict TLS client
that trusts only the CA; a leaf for any other name, even one signed with the CA's own key, fails
verification; leaves are cached and renewed; the trust bundle keeps every other host verifiable.

Real crypto and real TLS handshakes over loopback sockets; nothing of ours is mocked."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hubproxy.tls import authority, trust
from hubproxy.tls import leaves as leaves_module
from hubproxy.tls.leaves import Leaves
from tests.conftest import ROOT, _quiet_env, run_cli

HUB_HOSTS = ("tfhub.dev", "kaggle.com", "www.kaggle.com", "api.kaggle.com", "storage.googleapis.com")
UTC = datetime.timezone.utc


@pytest.fixture
def ca_dir(tmp_path) -> Path:
    directory = tmp_path / "ca"
    result = run_cli("ca", "init", "--ca-dir", directory)
    assert result.returncode == 0, result.stderr
    return directory


@pytest.fixture
def ca(ca_dir) -> authority.Authority:
    return authority.load(ca_dir)


# -- helpers: a real TLS server on 127.0.0.1 and a strict client ---------------------------------

def strict_client(cafile: Path) -> ssl.SSLContext:
    """A client as Python 3.13 builds one by default: hostname checked, VERIFY_X509_STRICT."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def handshake(server_context: ssl.SSLContext, host: str, client_context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """One TLS connection over loopback: (the certificate the client was served, what it read)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(60)
        thread = threading.Thread(target=_serve_one, args=(listener, server_context))
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=60) as raw:
                with client_context.wrap_socket(raw, server_hostname=host) as tls:
                    return tls.getpeercert(binary_form=True), tls.recv(5)
        finally:
            thread.join()


def _serve_one(listener: socket.socket, context: ssl.SSLContext) -> None:
    connection, _ = listener.accept()
    with connection:
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"hello")
        except (ssl.SSLError, OSError):
            pass  # the client refused the certificate: the test asserts on its side


def server_context_for(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey, tmp_path: Path):
    """A server context for a leaf the test built itself (files are fine here: test keys)."""
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


def leaf_signed_with_the_ca_key(ca_dir: Path, san: x509.GeneralName) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """What a thief holding ca.key would build: a well-formed server leaf for any name."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    # An IP address in the CN would itself be checked as a DNS name; a thief leaves the subject empty.
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, san.value)] if isinstance(san, x509.DNSName) else []
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return certificate, key


class Clock:
    """A clock the test moves; Leaves reads the time through it (its public parameter)."""

    def __init__(self, now: datetime.datetime):
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- ca init -----------------------------------------------------------------------------------

def test_ca_init_writes_the_certificate_and_a_key_only_its_owner_can_read(ca_dir):
    assert (ca_dir / "ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY-----" in (ca_dir / "ca.key").read_bytes()
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert (ca_dir / "trust-bundle.pem").is_file(), "init also writes the default trust bundle"


def test_ca_key_is_private_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        authority.init(tmp_path / "ca", authority.INTERCEPTED_HOSTS)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600


def test_second_init_is_refused_without_force_and_keeps_the_key(ca_dir):
    key, cert = (ca_dir / "ca.key").read_bytes(), (ca_dir / "ca.pem").read_bytes()

    again = run_cli("ca", "init", "--ca-dir", ca_dir)

    assert again.returncode == 2
    line = one_line(again.stderr)
    assert str(ca_dir) in line and "--force" in line
    assert (ca_dir / "ca.key").read_bytes() == key and (ca_dir / "ca.pem").read_bytes() == cert


def test_init_with_force_replaces_the_ca_and_its_bundle(ca_dir):
    old_cert = (ca_dir / "ca.pem").read_bytes()

    forced = run_cli("ca", "init", "--ca-dir", ca_dir, "--force")

    assert forced.returncode == 0, forced.stderr
    new_cert = (ca_dir / "ca.pem").read_bytes()
    assert new_cert != old_cert
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert authority.load(ca_dir).pem == new_cert, "the new key matches the new certificate"
    bundle = (ca_dir / "trust-bundle.pem").read_bytes()
    assert new_cert in bundle and old_cert not in bundle
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem", "trust-bundle.pem"], "no temp files left"


def test_ca_certificate_carries_each_extension_with_its_criticality(ca_dir):
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ext = cert.extensions

    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    constraints = ext.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    assert {n.value for n in constraints.value.permitted_subtrees} == {"tfhub.dev", "kaggle.com",
                                                                       "storage.googleapis.com"}
    assert {n.value for n in constraints.value.excluded_subtrees} == {ipaddress.ip_network("0.0.0.0/0"),
                                                                      ipaddress.ip_network("::/0")}
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value.startswith("hubproxy interception CA (")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc >= datetime.timedelta(days=3650)


def test_init_constrains_the_ca_to_extra_hosts_too(tmp_path):
    directory = tmp_path / "ca"
    result = run_cli("ca", "init", "--ca-dir", directory, "--host", "Models.Example.org", "--host", "dl.tfhub.dev")

    assert result.returncode == 0, result.stderr
    permitted = authority.load(directory).permitted
    assert set(permitted) == {"tfhub.dev", "kaggle.com", "storage.googleapis.com", "models.example.org"}


def _ca_init_with_env(directory: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubproxy", "ca", "init", "--ca-dir", str(directory)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=_quiet_env(**env), check=False)


def test_init_constrains_the_ca_to_the_configured_redirect_hosts(tmp_path):
    directory = tmp_path / "ca"

    result = _ca_init_with_env(directory, HUBPROXY_ALLOW_REDIRECT_HOSTS="dl.example.org,storage.googleapis.com")

    assert result.returncode == 0, result.stderr
    assert set(authority.load(directory).permitted) == {"tfhub.dev", "kaggle.com", "storage.googleapis.com",
                                                        "dl.example.org"}


def test_a_redirect_host_with_a_port_or_an_ip_address_does_not_stop_init(tmp_path):
    """allow_redirect_hosts takes HOST[:PORT] and IP literals; a name constraint is a bare DNS name,
    and the CA excludes every IP address anyway."""
    directory = tmp_path / "ca"

    result = _ca_init_with_env(directory, HUBPROXY_ALLOW_REDIRECT_HOSTS="dl.example.org:8443,10.0.0.5,"
                                                                        "DL.example.org,[::1]:8443")

    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    permitted = [n.value for n in constraints.permitted_subtrees]
    assert sorted(permitted) == ["dl.example.org", "kaggle.com", "storage.googleapis.com", "tfhub.dev"]
    assert {n.value for n in constraints.excluded_subtrees} == {ipaddress.ip_network("0.0.0.0/0"),
                                                                ipaddress.ip_network("::/0")}


@pytest.mark.parametrize("bad", ["*.example.org", "10.0.0.1", "https://example.org", "exa mple.org", "", "::1"])
def test_init_refuses_a_host_that_is_no_dns_name_and_writes_nothing(tmp_path, bad):
    directory = tmp_path / "ca"

    result = run_cli("ca", "init", "--ca-dir", directory, "--host", bad)

    assert result.returncode == 2
    assert repr(bad) in one_line(result.stderr) or bad in one_line(result.stderr)
    assert not directory.exists() or not any(directory.iterdir())


# -- leaves ------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", HUB_HOSTS)
def test_leaf_for_a_hub_host_passes_a_strict_client_trusting_only_the_ca(ca, ca_dir, host):
    served, said = handshake(Leaves(ca).context_for(host), host, strict_client(ca_dir / "ca.pem"))

    assert said == b"hello"
    leaf = x509.load_der_x509_certificate(served)
    ext = leaf.extensions
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [host]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == host
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= datetime.timedelta(days=200)
    assert leaf.not_valid_before_utc < datetime.datetime.now(UTC), "valid already, whatever the clock skew"
    assert leaf.public_key().public_numbers() != ca.certificate.public_key().public_numbers(), "its own key"


def test_leaf_context_refuses_tls_below_1_2(ca):
    context = Leaves(ca).context_for("tfhub.dev")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE, "a server context: it asks clients for no certificate"


@pytest.mark.parametrize("san", [x509.DNSName("evil.example"), x509.DNSName("tfhub.dev.evil.example"),
                                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                         ids=["other-host", "hub-name-as-prefix", "ip-address"])
def test_a_leaf_outside_the_constraints_fails_even_signed_with_the_ca_key(ca_dir, tmp_path, san):
    good = server_context_for(*leaf_signed_with_the_ca_key(ca_dir, x509.DNSName("tfhub.dev")), tmp_path)
    assert handshake(good, "tfhub.dev", strict_client(ca_dir / "ca.pem"))[1] == b"hello", "the builder is sound"
    forged = server_context_for(*leaf_signed_with_the_ca_key(ca_dir, san), tmp_path)
    name = str(san.value)

    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        handshake(forged, name, strict_client(ca_dir / "ca.pem"))

    assert refused.value.verify_code in (47, 48), refused.value  # permitted / excluded subtree violation


@pytest.mark.parametrize("host", ["evil.example", "tfhub.dev.evil.example", "nottfhub.dev", "127.0.0.1",
                                  "*.kaggle.com", "tfhub.dev:443"])
def test_leaves_refuse_a_host_outside_the_constraints(ca, host):
    with pytest.raises(ValueError) as refused:
        Leaves(ca).context_for(host)
    assert len(str(refused.value).splitlines()) == 1 and host in str(refused.value)


def test_leaves_are_cached_per_host(ca, ca_dir):
    leaves = Leaves(ca)
    client = strict_client(ca_dir / "ca.pem")

    first, second = leaves.leaf_for("tfhub.dev"), leaves.leaf_for("TFHub.dev.")
    served_twice = {handshake(leaves.context_for("tfhub.dev"), "tfhub.dev", client)[0] for _ in range(2)}

    assert first is second and leaves.context_for("tfhub.dev") is first.context
    assert served_twice == {first.certificate.public_bytes(serialization.Encoding.DER)}
    assert leaves.leaf_for("api.kaggle.com").certificate.serial_number != first.certificate.serial_number


def test_a_leaf_near_its_end_is_renewed_and_the_new_one_serves(ca, ca_dir):
    real_now = datetime.datetime.now(UTC)
    lifetime = datetime.timedelta(days=90)
    clock = Clock(real_now - datetime.timedelta(days=70))
    leaves = Leaves(ca, lifetime=lifetime, clock=clock)
    old = leaves.leaf_for("tfhub.dev")

    clock.now = real_now - datetime.timedelta(days=40)  # 59 of its 90 days left: more than a third
    kept = leaves.leaf_for("tfhub.dev")
    clock.now = real_now  # 19 days left, under a third: renew
    renewed = leaves.leaf_for("tfhub.dev")

    assert kept is old
    assert renewed is not old and renewed.certificate.serial_number != old.certificate.serial_number
    assert renewed.certificate.not_valid_after_utc > old.certificate.not_valid_after_utc
    served, said = handshake(leaves.context_for("tfhub.dev"), "tfhub.dev", strict_client(ca_dir / "ca.pem"))
    assert said == b"hello" and served == renewed.certificate.public_bytes(serialization.Encoding.DER)


def test_a_leaf_lifetime_over_200_days_is_refused(ca):
    with pytest.raises(ValueError, match="200 days"):
        Leaves(ca, lifetime=datetime.timedelta(days=201))


# -- load --------------------------------------------------------------------------------------

def test_load_names_a_missing_ca(tmp_path):
    with pytest.raises(authority.CAError) as refused:
        authority.load(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "ca.pem") in str(refused.value) and "ca init" in str(refused.value)


def test_load_names_a_key_that_is_not_the_certificates(tmp_path):
    authority.init(tmp_path / "a", authority.INTERCEPTED_HOSTS)
    authority.init(tmp_path / "b", authority.INTERCEPTED_HOSTS)
    (tmp_path / "a" / "ca.key").write_bytes((tmp_path / "b" / "ca.key").read_bytes())

    with pytest.raises(authority.CAError) as refused:
        authority.load(tmp_path / "a")
    assert "does not match" in str(refused.value) and str(tmp_path / "a" / "ca.key") in str(refused.value)


def test_load_refuses_a_certificate_that_is_not_a_name_constrained_ca(ca_dir, tmp_path):
    leaf, _ = leaf_signed_with_the_ca_key(ca_dir, x509.DNSName("tfhub.dev"))
    (ca_dir / "ca.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(authority.CAError, match="not a CA"):
        authority.load(ca_dir)

    (ca_dir / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(authority.CAError, match="not a PEM certificate"):
        authority.load(ca_dir)


def test_cli_names_the_unreadable_ca_in_one_line(tmp_path):
    (tmp_path / "ca").mkdir()
    (tmp_path / "ca" / "ca.pem").write_text("garbage\n")
    result = run_cli("ca", "bundle", "--ca-dir", tmp_path / "ca")
    assert result.returncode == 2
    assert str(tmp_path / "ca" / "ca.pem") in one_line(result.stderr)


# -- bundle and env ----------------------------------------------------------------------------

def test_ca_bundle_holds_the_system_store_and_the_ca(ca, ca_dir, tmp_path):
    out = tmp_path / "bundle.pem"
    result = run_cli("ca", "bundle", "--ca-dir", ca_dir, "--out", out)

    assert result.returncode == 0, result.stderr
    bundle = out.read_bytes()
    system = trust.system_store().read_bytes()
    assert system.strip() in bundle and ca.pem in bundle
    assert bundle.count(b"-----BEGIN CERTIFICATE-----") == system.count(b"-----BEGIN CERTIFICATE-----") + 1
    served, _ = handshake(Leaves(ca).context_for("tfhub.dev"), "tfhub.dev", strict_client(out))
    assert served, "a client pointed at the bundle trusts the leaves"


def test_a_bundle_rebuilt_while_ssl_cert_file_names_it_holds_the_ca_once(ca, ca_dir, monkeypatch):
    bundle = ca_dir / "trust-bundle.pem"
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # as after `eval "$(hubproxy ca env ...)"`

    rebuilt = trust.trust_bundle(ca.pem)

    assert rebuilt.count(ca.pem) == 1
    assert rebuilt == bundle.read_bytes()


def test_ca_env_prints_the_three_variables(ca_dir):
    result = run_cli("ca", "env", "--ca-dir", ca_dir, "--proxy", "http://mirror:8080")

    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines()
                   if line.startswith("export "))
    bundle = str((ca_dir / "trust-bundle.pem").resolve())
    assert exports == {"HTTPS_PROXY": "http://mirror:8080", "SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle}


def test_ca_env_refuses_a_missing_bundle_and_a_bad_proxy_url(ca_dir):
    (ca_dir / "trust-bundle.pem").unlink()
    missing = run_cli("ca", "env", "--ca-dir", ca_dir, "--proxy", "http://mirror:8080")
    bad_proxy = run_cli("ca", "env", "--ca-dir", ca_dir, "--proxy", "mirror:8080")

    assert missing.returncode == 2 and "ca bundle" in one_line(missing.stderr)
    assert str(ca_dir / "trust-bundle.pem") in missing.stderr
    assert bad_proxy.returncode == 2 and "mirror:8080" in one_line(bad_proxy.stderr)


def test_ca_dir_comes_from_the_environment_too(tmp_path):
    directory = tmp_path / "from-env"
    result = subprocess.run([sys.executable, "-m", "hubproxy", "ca", "init"], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=_quiet_env(HUBPROXY_CA_DIR=str(directory)))
    assert result.returncode == 0, result.stderr
    assert (directory / "ca.pem").is_file()



def test_the_fallback_without_memfd_serves_the_leaf_and_leaves_no_file_behind(ca, ca_dir, tmp_path, monkeypatch):
    """Where os.memfd_create is missing (macOS), the key goes through a private, encrypted temp file."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where that temp file is made
    (tmp_path / "tmp").mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    an_hour_ago = datetime.datetime.now(UTC) - datetime.timedelta(hours=1)
    certificate = leaves_module.sign_leaf(ca, "tfhub.dev", key, an_hour_ago, leaves_module.DEFAULT_LIFETIME)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    leaves_module._load_from_encrypted_temp_file(context, certificate.public_bytes(serialization.Encoding.PEM), key)

    assert list((tmp_path / "tmp").iterdir()) == [], "the temp file is removed once loaded"
    served, said = handshake(context, "tfhub.dev", strict_client(ca_dir / "ca.pem"))
    assert said == b"hello" and served == certificate.public_bytes(serialization.Encoding.DER)
