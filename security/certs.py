"""The cluster CA and the certificates it issues, kept as PEM files in one directory.

Layout of a certificate directory:

    DIR/ca.crt                      the cluster CA certificate (every peer trusts it)
    DIR/ca.key                      the CA's private key (0600; needed only to issue)
    DIR/control-plane.crt, .key     the control plane: spiffe://lockstep/control-plane
    DIR/agents/<node>.crt, .key     node agent <node>: spiffe://lockstep/agent/<node>

Keys are EC P-256 (fast to make and to handshake), certificates are X.509 v3 signed with
ECDSA-SHA256; identities are URI SANs plus a DNS SAN (see `security.identity`) and the CN.

Creation is idempotent: `init_ca` keeps an existing CA, `issue` keeps an existing certificate
that the current CA signed and that is valid for at least `renew_before` more, and only then
writes a new one. Rotation is issuing anew with `rotate=True` (`lpuctl certs issue DIR --node N
--rotate`, `--control-plane --rotate`), then restarting the process that uses it; the CA is
trusted until it is replaced, and replacing it (a new DIR, new certificates for everyone)
is a cluster-wide restart. Files are written to a temporary name and renamed, keys created
0600, and an exclusive lock on `DIR/.lock` serializes writers (agents that create their own
certificate on first start may share a directory).

Time is an input (`now`), so tests can issue certificates that are already expired.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from security.identity import (
    AGENT_PREFIX,
    ANY_AGENT_DNS,
    CONTROL_PLANE,
    agent_identity,
    check_node_name,
    dns_name,
)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CONTROL_PLANE_NAME = "control-plane"
AGENTS_DIR = "agents"


@dataclass(frozen=True)
class CertSettings:
    """Validity periods (days) and when an existing certificate counts as due for renewal."""

    ca_days: int = 3650
    cert_days: int = 365
    renew_before_days: int = 30
    backdate_minutes: int = 5  # tolerate clocks a little behind the issuer's


DEFAULT_CERT_SETTINGS = CertSettings()


class CertError(Exception):
    """A certificate directory that cannot be used (unreadable, mismatched, wrong CA)."""


@dataclass(frozen=True)
class Credentials:
    """One peer's PEM material: its certificate, its key and the CA certificate it trusts."""

    identity: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def _now(now: dt.datetime | None) -> dt.datetime:
    return now or dt.datetime.now(dt.UTC)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}") from None


def paths_for(directory: Path, identity: str) -> tuple[Path, Path]:
    """(certificate, key) paths of `identity` in `directory`."""
    if identity == CONTROL_PLANE:
        base = directory / CONTROL_PLANE_NAME
    else:
        dns_name(identity)  # validates it
        base = directory / AGENTS_DIR / identity.removeprefix(AGENT_PREFIX)
    return base.with_suffix(".crt"), base.with_suffix(".key")


def init_ca(
    directory: str | Path,
    settings: CertSettings = DEFAULT_CERT_SETTINGS,
    *,
    now: dt.datetime | None = None,
) -> bool:
    """Create the cluster CA in `directory` unless it has one; True when one was created."""
    directory = Path(directory)
    with _locked(directory):
        return _init_ca(directory, settings, _now(now))


def _init_ca(directory: Path, settings: CertSettings, now: dt.datetime) -> bool:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and key_path.exists():
        return False
    if cert_path.exists() or key_path.exists():
        raise CertError(f"{directory} has only one of {CA_CERT} and {CA_KEY}: restore or remove it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lockstep"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Lockstep cluster CA"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=settings.backdate_minutes))
        .not_valid_after(now + dt.timedelta(days=settings.ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(_read(directory / CA_CERT))
    key = serialization.load_pem_private_key(_read(directory / CA_KEY), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{directory / CA_KEY} is not an EC key")
    return cert, key


def _still_good(
    cert_path: Path,
    key_path: Path,
    ca: x509.Certificate,
    settings: CertSettings,
    now: dt.datetime,
    hosts: Sequence[str] = (),
) -> bool:
    """An existing certificate the current CA signed, valid for `renew_before_days` more,
    that names every one of `hosts` (a control plane started with a new `--listen` address
    gets a certificate for it)."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca)
        if hosts and not set(map(_host_name, hosts)) <= set(cert_hosts(cert)):
            return False
    except (ValueError, TypeError, InvalidSignature, OSError):
        return False
    margin = dt.timedelta(days=settings.renew_before_days)
    return cert.not_valid_before_utc <= now and now + margin < cert.not_valid_after_utc


def _host_name(host: str) -> x509.GeneralName:
    """A host for a certificate's SANs: an IP address entry, else a DNS name."""
    try:
        return x509.IPAddress(ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def cert_hosts(cert: x509.Certificate) -> list[x509.GeneralName]:
    """The IP address and DNS name entries of `cert`'s subject alternative names."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n for n in sans if isinstance(n, x509.IPAddress | x509.DNSName)]


def issue(
    directory: str | Path,
    identity: str,
    settings: CertSettings = DEFAULT_CERT_SETTINGS,
    *,
    hosts: Sequence[str] = (),
    rotate: bool = False,
    now: dt.datetime | None = None,
    days: float | None = None,
) -> bool:
    """Issue `identity`'s certificate and key with the CA in `directory` (which must exist).

    Keeps a still-good existing certificate unless `rotate`; True when one was written.
    `hosts` adds DNS names or IP addresses (for clients that check the real host name);
    `days` overrides the validity (tests: a negative value gives an expired certificate)."""
    directory = Path(directory)
    now = _now(now)
    dns = dns_name(identity)  # validates the identity
    with _locked(directory):
        if not (directory / CA_CERT).exists():
            raise CertError(f"{directory} has no cluster CA: run 'lpuctl certs init {directory}'")
        ca, ca_key = _load_ca(directory)
        cert_path, key_path = paths_for(directory, identity)
        if (
            not rotate
            and days is None
            and _still_good(cert_path, key_path, ca, settings, now, hosts)
        ):
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(identity),
            x509.DNSName(dns),
        ]
        if identity != CONTROL_PLANE:
            names.append(x509.DNSName(ANY_AGENT_DNS))
        for host in dict.fromkeys(hosts):
            names.append(_host_name(host))
        lifetime = dt.timedelta(days=settings.cert_days if days is None else days)
        start = now - dt.timedelta(minutes=settings.backdate_minutes)
        end = now + lifetime
        if end <= start:  # an already-expired certificate (tests): a valid, short interval
            start = end - dt.timedelta(days=1)
        cn = "Lockstep control plane" if identity == CONTROL_PLANE else f"Lockstep agent {dns}"
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Lockstep"),
                        x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    ]
                )
            )
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write(key_path, _key_pem(key), 0o600)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return True


def init_cluster(
    directory: str | Path,
    settings: CertSettings = DEFAULT_CERT_SETTINGS,
    *,
    hosts: Sequence[str] = (),
) -> tuple[bool, bool]:
    """`lpuctl certs init`: the CA and the control-plane certificate (each only if missing;
    the certificate also when it does not name every one of `hosts`, the addresses the
    control plane serves on)."""
    made_ca = init_ca(directory, settings)
    return made_ca, issue(directory, CONTROL_PLANE, settings, hosts=hosts)


def ensure_agent(
    directory: str | Path, node: str, settings: CertSettings = DEFAULT_CERT_SETTINGS
) -> Credentials:
    """The embedded default's first start: create the CA (if the directory has none) and this
    node's certificate (if missing or due), then load it. In production the control plane
    issues agent certificates and ships them (e.g. a Kubernetes Secret per node) without the
    CA key, and the agent only loads them."""
    directory = Path(directory)
    identity = agent_identity(node)
    if not paths_for(directory, identity)[0].exists():
        init_ca(directory, settings)
    if (directory / CA_KEY).exists():  # can issue: renew when missing, due or of another CA
        issue(directory, identity, settings)
    creds = load(directory, identity)
    check_current(creds)
    return creds


def check_current(creds: Credentials, now: dt.datetime | None = None) -> None:
    """CertError unless `creds`' certificate is within its validity period and was issued by
    the CA it trusts: a peer could not accept it, so failing at start names the cause."""
    now = _now(now)
    try:
        cert = x509.load_pem_x509_certificate(creds.cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(creds.ca_pem))
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertError(
            f"the certificate of {creds.identity} is not issued by the CA beside it ({exc})"
        ) from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(
            f"the certificate of {creds.identity} is valid {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d}, not now: issue a new one "
            "('lpuctl certs issue DIR --node NAME --rotate')"
        )


def load(directory: str | Path, identity: str) -> Credentials:
    """Read `identity`'s certificate, key and the CA certificate from `directory`."""
    directory = Path(directory)
    cert_path, key_path = paths_for(directory, identity)
    return Credentials(identity, _read(cert_path), _read(key_path), _read(directory / CA_CERT))


def load_agent(directory: str | Path, node: str) -> Credentials:
    return load(directory, agent_identity(check_node_name(node)))


def load_control_plane(directory: str | Path) -> Credentials:
    return load(directory, CONTROL_PLANE)
