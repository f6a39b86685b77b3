"""Keys and transport: a site makes its own key pair, private keys are 0600 from the first byte and refused when
others can read them, and the coordinator refuses plain text unless it listens on loopback."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from fedsubtype.errors import ConfigError, UserError


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    """umask 0: files are as open as their creator allows, so only an explicit mode keeps a key private."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_private_keys_are_0600_before_their_bytes_land(tmp_path, monkeypatch, open_umask):
    from fedsubtype.federation import credentials

    seen: dict[str, int] = {}
    real_replace = os.replace

    def recording_replace(src, dst):
        seen[Path(dst).name] = _mode(Path(src))  # the temporary file already holds the whole secret here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    paths = credentials.create_dev_credentials(tmp_path / "c", ["a", "b"])
    for name in ("ca.key", "server.key", "a.key", "b.key"):
        assert seen[name] == 0o600, (name, oct(seen[name]))
    for p in (paths.ca_key, paths.server_key, *paths.site_private_keys.values()):
        assert _mode(p) == 0o600
    for p in (paths.ca_cert, paths.server_cert, *paths.site_public_keys.values()):
        assert _mode(p) == 0o644


def test_a_key_others_can_read_is_refused_with_the_chmod_that_fixes_it(tmp_path):
    from fedsubtype.federation.credentials import check_private_key_file, create_site_keypair

    key, _ = create_site_keypair(tmp_path, "a")
    assert check_private_key_file(key, where="site.yaml: auth_private_key") == key
    for mode in (0o640, 0o604, 0o644):
        os.chmod(key, mode)
        with pytest.raises(UserError) as err:
            check_private_key_file(key, where="site.yaml: auth_private_key")
        line = err.value.line()
        assert "\n" not in line and str(key) in line and f"chmod 600 {key}" in line and f"{mode:04o}" in line
    os.chmod(key, 0o400)
    assert check_private_key_file(key, where="site.yaml: auth_private_key") == key


def test_the_site_command_stops_on_a_readable_key_in_one_line(tmp_path, capsys):
    from fedsubtype.cli.client_cli import main
    from fedsubtype.federation.credentials import create_dev_credentials

    creds = create_dev_credentials(tmp_path / "c", ["a"])
    key = creds.site_private_keys["a"]
    os.chmod(key, 0o644)
    (tmp_path / "m.csv").write_text("case_id,image,mask,site,er,pr,her2,ki67\n", encoding="utf-8")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "a", "manifest": "m.csv", "ca_certificate": str(creds.ca_cert),
                                    "auth_private_key": str(key)}), encoding="utf-8")
    assert main(["--site", str(site)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"chmod 600 {key}" in err and "Traceback" not in err


def _federation(tmp_path: Path, creds, **extra) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump({
        "sites": [{"name": "a", "public_key": str(creds.site_public_keys["a"])}], "min_sites": 1,
        "tls": {"ca_certificate": str(creds.ca_cert), "certificate": str(creds.server_cert),
                "private_key": str(creds.server_key)}, **extra}), encoding="utf-8")
    return path


def test_the_coordinator_refuses_a_readable_server_key(tmp_path):
    from fedsubtype.federation.config import load_federation_config
    from fedsubtype.federation.credentials import create_dev_credentials

    creds = create_dev_credentials(tmp_path / "c", ["a"])
    path = _federation(tmp_path, creds)
    load_federation_config(path).check_files(str(path))
    os.chmod(creds.server_key, 0o640)
    with pytest.raises(UserError, match=r"tls\.private_key.*chmod 600"):
        load_federation_config(path).check_files(str(path))


@pytest.mark.parametrize("host, allowed", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("127.0.0.2", True), ("0.0.0.0", False), ("10.1.2.3", False),
                                           ("coordinator.example.org", False)])
def test_plain_text_only_on_loopback(tmp_path, host, allowed):
    from fedsubtype.federation.config import load_federation_config
    from fedsubtype.federation.credentials import create_dev_credentials

    path = _federation(tmp_path, create_dev_credentials(tmp_path / "c", ["a"]), insecure=True, host=host)
    if allowed:
        assert load_federation_config(path).insecure
    else:
        with pytest.raises(ConfigError, match="insecure") as err:
            load_federation_config(path)
        assert host in err.value.line() and "\n" not in err.value.line()
    path = _federation(tmp_path, create_dev_credentials(tmp_path / "d", ["a"]), host=host)
    assert load_federation_config(path).host == host  # with TLS, any interface


def test_superlink_port_must_differ_from_the_public_port(tmp_path):
    from fedsubtype.federation.config import load_federation_config
    from fedsubtype.federation.credentials import create_dev_credentials

    creds = create_dev_credentials(tmp_path / "c", ["a"])
    with pytest.raises(ConfigError, match="superlink_port"):
        load_federation_config(_federation(tmp_path, creds, port=9092, superlink_port=9092))
    assert load_federation_config(_federation(tmp_path, creds, port=9092, superlink_port=9093)).superlink_port == 9093


def test_keygen_makes_a_pair_and_shows_only_the_public_half(tmp_path, capsys, open_umask):
    from fedsubtype.cli.keygen_cmd import main
    from fedsubtype.federation.credentials import (check_private_key_file, check_public_key_file,
                                                   public_key_fingerprint)

    assert main(["--out", str(tmp_path / "keys"), "--site", "hospital-1"]) == 0
    out = capsys.readouterr().out
    key, pub = tmp_path / "keys" / "hospital-1.key", tmp_path / "keys" / "hospital-1.pub"
    assert _mode(key) == 0o600 and _mode(pub) == 0o644
    check_private_key_file(key, where="test")
    check_public_key_file(pub, where="test")
    assert str(pub) in out and public_key_fingerprint(pub) in out
    assert "PRIVATE KEY" not in out and key.read_text(encoding="ascii").splitlines()[1] not in out
    if shutil.which("ssh-keygen"):  # the fingerprint is the one OpenSSH shows for the same file
        shown = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, check=True)
        assert public_key_fingerprint(pub) in shown.stdout

    before = key.read_bytes()
    assert main(["--out", str(tmp_path / "keys"), "--site", "hospital-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and key.read_bytes() == before
    assert main(["--out", str(tmp_path / "keys"), "--site", "hospital-1", "--overwrite"]) == 0
    assert key.read_bytes() != before and _mode(key) == 0o600


def test_keygen_refuses_a_bad_site_name(tmp_path, capsys):
    from fedsubtype.cli.keygen_cmd import main

    assert main(["--out", str(tmp_path), "--site", "../evil"]) == 1
    assert "invalid site name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_superexec_secret_is_random_and_private(tmp_path, open_umask):
    from fedsubtype.federation.credentials import create_secret_file

    a = create_secret_file(tmp_path / "a.secret").read_bytes()
    b = create_secret_file(tmp_path / "b.secret").read_bytes()
    assert len(a) == 64 and a != b and int(a, 16) >= 0
    assert _mode(tmp_path / "a.secret") == 0o600


def test_the_site_command_makes_keys_and_the_dev_helper_says_it_is_for_a_trial(tmp_path, capsys):
    from fedsubtype.cli.client_cli import main as client_main
    from fedsubtype.cli.server_cli import main as server_main

    assert client_main(["keygen", "--out", str(tmp_path / "k"), "--site", "a"]) == 0
    assert _mode(tmp_path / "k" / "a.key") == 0o600 and (tmp_path / "k" / "a.pub").is_file()
    capsys.readouterr()
    assert server_main(["credentials", "--out", str(tmp_path / "c"), "--sites", "a,b"]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "fedsubtype-client keygen" in ln]
    assert len(notes) == 1 and "trial on one machine" in notes[0]
