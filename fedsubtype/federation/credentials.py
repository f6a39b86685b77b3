"""Key pairs and certificates: a site's own key pair (`fedsubtype-client keygen`), development credentials for a
local trial (a CA, a SuperLink TLS certificate and one key pair per site), and the checks every key file passes.

Written with the `cryptography` package (no openssl needed). Private keys are created with mode 0600 before a byte
is written and are refused when group or others can read them. Production deployments should use the hospital's
own PKI and let each site make its own key pair; the development helper makes every key in one place.

Layout of the output folder::

    ca.crt, ca.key                 certificate authority (ca.crt goes to every site as `ca_certificate`)
    server.crt, server.key         SuperLink TLS certificate for the given hostnames / IP addresses
    sites/<name>.key               site's SuperNode authentication private key (OpenSSH format, EC P-384)
    sites/<name>.pub               its public key, registered on the SuperLink by the coordinator
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from fedsubtype.configio import atomic_write_bytes
from fedsubtype.errors import UserError

SITE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CredentialPaths:
    """Where :func:`create_dev_credentials` wrote each file."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    site_private_keys: dict[str, Path]
    site_public_keys: dict[str, Path]


def check_site_name(name: str, where: str = "site") -> str:
    """A site name usable in file names and logs (letters, digits, '-', '_', '.')."""
    if not SITE_NAME_PATTERN.match(name or ""):
        raise UserError(f"invalid site name {name!r}", "use letters, digits, '-', '_' or '.' (max 64)", where=where)
    return name


def write_private_file(path: str | os.PathLike, data: bytes) -> None:
    """Write a secret atomically with mode 0600 from the start: the bytes never sit in a file others can read."""
    atomic_write_bytes(path, data, mode=0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _name(common_name: str):
    from cryptography.x509.oid import NameOID
    from cryptography import x509

    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsubtype development"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _san_entries(hosts: Sequence[str]):
    from cryptography import x509

    entries = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def create_dev_credentials(out_dir: str | os.PathLike, sites: Sequence[str],
                           hosts: Sequence[str] = ("localhost", "127.0.0.1"),
                           valid_days: int = 365, overwrite: bool = False) -> CredentialPaths:
    """Create a CA, a server certificate valid for `hosts`, and an EC P-384 key pair for each site."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out = Path(out_dir)
    _check_request(out, sites, hosts, overwrite)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=valid_days)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    nocrypt = serialization.NoEncryption()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedsubtype development CA"))
        .issuer_name(_name("fedsubtype development CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = CredentialPaths(out, out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key", {}, {})
    _write_public(paths.ca_cert, ca_cert.public_bytes(pem))
    write_private_file(paths.ca_key, ca_key.private_bytes(pem, pkcs8, nocrypt))
    _write_public(paths.server_cert, server_cert.public_bytes(pem))
    write_private_file(paths.server_key, server_key.private_bytes(pem, pkcs8, nocrypt))
    for site in sites:
        private, public = create_site_keypair(out / "sites", site)
        paths.site_private_keys[site] = private
        paths.site_public_keys[site] = public
    return paths


def _check_request(out: Path, sites: Sequence[str], hosts: Sequence[str], overwrite: bool) -> None:
    """Site names valid and distinct, at least one host, and no credentials overwritten by accident."""
    if not sites:
        raise UserError("no site names given", "pass --sites a,b,c", where="credentials")
    if not hosts:
        raise UserError("no host names given", "pass --hosts localhost,127.0.0.1", where="credentials")
    for s in sites:
        check_site_name(s, where="--sites")
    if len(set(sites)) != len(sites):
        raise UserError("site names repeat", "give each site once", where="--sites")
    if (out / "ca.key").exists() and not overwrite:
        raise UserError("credentials already exist", "choose another --out folder or pass --overwrite", where=str(out))


def create_site_keypair(folder: str | os.PathLike, site: str, overwrite: bool = True) -> tuple[Path, Path]:
    """One EC P-384 SuperNode authentication key pair in OpenSSH format: (<site>.key, <site>.pub)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    check_site_name(site)
    folder = Path(folder)
    private = folder / f"{site}.key"
    public = folder / f"{site}.pub"
    if not overwrite and (private.exists() or public.exists()):
        raise UserError(f"a key pair for {site} already exists", "keep it, or pass --overwrite to make a new one "
                        "(the coordinator must then register the new .pub)", where=str(private))
    key = ec.generate_private_key(ec.SECP384R1())
    write_private_file(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
    _write_public(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def check_certificate_file(path: str | os.PathLike, where: str) -> Path:
    """A readable PEM certificate, or a one-line UserError saying which file is wrong."""
    from cryptography import x509

    p = Path(path)
    if not p.is_file():
        raise UserError(f"certificate file not found: {p}", "check the path", where=where)
    try:
        x509.load_pem_x509_certificate(p.read_bytes())
    except ValueError:
        raise UserError(f"{p} is not a PEM certificate", "use the CA certificate (ca.crt) you were given",
                        where=where) from None
    return p


def check_private_key_file(path: str | os.PathLike, where: str) -> Path:
    """A readable OpenSSH EC private key for SuperNode authentication, or a one-line UserError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p = Path(path)
    if not p.is_file():
        raise UserError(f"key file not found: {p}", "check the path", where=where)
    check_private_file_mode(p, where)
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise UserError(f"{p} is not an OpenSSH private key", "use the <site>.key file created for this site",
                        where=where) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{p} is not an EC key", "create an EC P-384 key (fedsubtype-server credentials)",
                        where=where)
    return p


def check_private_file_mode(path: str | os.PathLike, where: str) -> Path:
    """A secret file only its owner can read; otherwise a one-line UserError with the `chmod` that fixes it."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"key file not found: {p}", "check the path", where=where)
    if os.name != "posix":
        return p
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise UserError(f"private key {p} can be read by group or others (mode {mode:04o})",
                        f"run: chmod 600 {p}", where=where)
    return p


def create_secret_file(path: str | os.PathLike) -> Path:
    """A fresh random shared secret (64 hex characters), mode 0600: e.g. Flower's SuperExec authentication secret."""
    import secrets

    write_private_file(path, secrets.token_hex(32).encode("ascii"))
    return Path(path)


def public_key_fingerprint(path: str | os.PathLike) -> str:
    """SHA256 fingerprint of an OpenSSH public key, as `ssh-keygen -l` prints it, for checking a .pub out of band."""
    import base64

    blob = base64.b64decode(Path(path).read_text(encoding="ascii").split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def check_public_key_file(path: str | os.PathLike, where: str) -> Path:
    """A readable OpenSSH EC public key (the form `flwr supernode register` accepts)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    p = Path(path)
    if not p.is_file():
        raise UserError(f"public key not found: {p}", "check the path", where=where)
    try:
        key = serialization.load_ssh_public_key(p.read_bytes())
    except (ValueError, TypeError):
        raise UserError(f"{p} is not an OpenSSH public key", "use the <site>.pub file", where=where) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UserError(f"{p} is not an EC public key", "create an EC P-384 key pair", where=where)
    return p
