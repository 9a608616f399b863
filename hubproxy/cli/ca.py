"""`hubproxy ca`: the interception CA that clients trust for the hub hosts, and for no other site.

Invariants: the CA dir comes from --ca-dir, HUBPROXY_CA_DIR or the TOML file's ca_dir; a CA is
never overwritten without --force; `bundle` and `env` read only the CA's certificate, never its
key; every failure is one line naming the path at fault (exit 2).
"""

from __future__ import annotations

import shlex
import urllib.parse
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from ..config import Settings
from ..tls import authority, names, trust
from .common import config_option, setting_option, settings_or_exit
from .failures import fail, path_problem

_OUT_HELP = "Where the bundle goes (the system trust store plus the CA)."


def _ca_options(command):
    command = config_option("TOML settings file (for ca_dir; init also reads allow_redirect_hosts).")(command)
    return setting_option("--ca-dir", "ca_dir", "The interception CA's directory (ca.pem, ca.key, trust-bundle.pem).",
                          metavar="DIR")(command)


def _settings(ca_dir, config_file) -> tuple[Path, Settings]:
    settings = settings_or_exit(config_file, {"ca_dir": ca_dir})
    if settings.ca_dir is None:
        fail("no CA dir: give --ca-dir DIR (or set HUBPROXY_CA_DIR, or ca_dir in --config)")
    return settings.ca_path, settings


def _ca_pem(directory: Path) -> bytes:
    try:
        return authority.load_certificate(directory).public_bytes(serialization.Encoding.PEM)
    except authority.CAError as e:
        fail(str(e))


@click.group("ca")
def group() -> None:
    """The interception CA: clients trust it for tfhub.dev, Kaggle and storage.googleapis.com only.

    Its certificate is name-constrained (X.509 nameConstraints, critical) to the hosts hubproxy
    intercepts, so its key cannot speak for any other site. Point clients at it with `ca env`.

    \b
    Example:
      hubproxy ca init --ca-dir /etc/hubproxy/ca
      eval "$(hubproxy ca env --ca-dir /etc/hubproxy/ca --proxy http://mirror:8080)"
    """


@group.command("init")
@_ca_options
@click.option("--force", is_flag=True, help="Replace an existing CA (clients must trust the new one).")
@click.option("--host", "hosts", multiple=True, metavar="HOST",
              help="Another host the CA may sign for (repeatable), besides the hub hosts and allow_redirect_hosts.")
def ca_init(ca_dir, config_file, force, hosts) -> None:
    """Write DIR/ca.pem, DIR/ca.key (0600) and DIR/trust-bundle.pem; never overwrites a CA without --force.

    The CA is constrained to tfhub.dev, kaggle.com (www., api.), storage.googleapis.com, the
    configured allow_redirect_hosts (by name: a :PORT dropped, IP addresses left out) and every
    --host, and to no IP address.

    \b
    Example:
      hubproxy ca init --ca-dir /etc/hubproxy/ca
      hubproxy ca init --ca-dir /etc/hubproxy/ca --host models.example.org --force
    """
    directory, settings = _settings(ca_dir, config_file)
    problem = path_problem(directory, "CA dir")
    if problem:
        fail(problem)
    redirect_hosts = names.redirect_host_names(settings.allow_redirect_hosts)
    constrained = (*authority.INTERCEPTED_HOSTS, *redirect_hosts, *hosts)
    try:
        ca = authority.init(directory, constrained, force=force)
    except authority.CAError as e:
        fail(str(e))
    cert, key = authority.paths(directory)
    try:
        bundle = trust.write_bundle(ca.pem, trust.default_path(directory))
    except trust.TrustStoreError as e:
        fail(f"CA written to {directory}, but no trust bundle: {e}")
    click.echo(f"CA certificate {cert}, key {key} (0600), for {', '.join(ca.permitted)} only; "
               f"trust bundle {bundle}")


@group.command("bundle")
@_ca_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help=f"{_OUT_HELP}  [default: DIR/{trust.BUNDLE_NAME}]")
def ca_bundle(ca_dir, config_file, out) -> None:
    """Write the system trust store plus the CA, for SSL_CERT_FILE and REQUESTS_CA_BUNDLE.

    A client pointed at it trusts the hub hosts' intercepted certificates and every other host as
    before. Run it again after the system's trust store changes.

    \b
    Example:
      hubproxy ca bundle --ca-dir /etc/hubproxy/ca --out /etc/hubproxy/trust-bundle.pem
    """
    directory, _ = _settings(ca_dir, config_file)
    out = out or trust.default_path(directory)
    try:
        trust.write_bundle(_ca_pem(directory), out)
    except trust.TrustStoreError as e:
        fail(str(e))
    click.echo(f"trust bundle {out}: the system trust store plus {authority.paths(directory)[0]}")


@group.command("env")
@_ca_options
@click.option("--proxy", required=True, metavar="URL", help="The hubproxy clients go through (http://mirror:8080).")
@click.option("--bundle", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help=f"The trust bundle clients read (from `ca bundle`).  [default: DIR/{trust.BUNDLE_NAME}]")
def ca_env(ca_dir, config_file, proxy, bundle) -> None:
    """Print the shell lines that send clients through hubproxy: HTTPS_PROXY, SSL_CERT_FILE (read
    by tensorflow_hub's urllib) and REQUESTS_CA_BUNDLE (read by requests, so kagglehub).

    \b
    Example:
      eval "$(hubproxy ca env --ca-dir /etc/hubproxy/ca --proxy http://mirror:8080)"
    """
    directory, _ = _settings(ca_dir, config_file)
    _check_proxy_url(proxy)
    bundle = (bundle or trust.default_path(directory)).resolve()
    _check_bundle_holds(bundle, _ca_pem(directory), directory)
    click.echo(f"export HTTPS_PROXY={shlex.quote(proxy)}")
    click.echo(f"export SSL_CERT_FILE={shlex.quote(str(bundle))}")
    click.echo(f"export REQUESTS_CA_BUNDLE={shlex.quote(str(bundle))}")
    click.echo("# other HTTPS hosts get 403 from hubproxy unless serve --tunnel allows them: list them in NO_PROXY")


def _check_proxy_url(proxy: str) -> None:
    try:
        parts = urllib.parse.urlsplit(proxy)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError as e:
        fail(f"--proxy {proxy!r}: {e}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"--proxy {proxy!r} is not an http:// URL of a hubproxy (http://mirror:8080)")


def _check_bundle_holds(bundle: Path, ca_pem: bytes, directory: Path) -> None:
    remedy = f"hubproxy ca bundle --ca-dir {directory} --out {bundle}"
    try:
        held = bundle.read_bytes()
    except FileNotFoundError:
        fail(f"trust bundle {bundle} does not exist; write it with: {remedy}")
    except OSError as e:
        fail(f"cannot read trust bundle {bundle}: {e.strerror}")
    if ca_pem not in held:
        fail(f"trust bundle {bundle} does not hold the CA in {directory}; rewrite it with: {remedy}")
