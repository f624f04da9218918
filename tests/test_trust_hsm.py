"""Signing keys in a PKCS#11 token: SoftHSM2 as a real token, one token store per test
(SOFTHSM2_CONF in the test's directory); skipped cleanly when softhsm2 is absent."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Targets

from swarmota.cli import main
from swarmota.seeder.errors import SigningError
from swarmota.seeder.hsm import TokenConfig, generate_token_key, token_signer
from swarmota.seeder.keys import load_private_key, load_public_key
from swarmota.seeder.publish import is_live, publish_release
from swarmota.seeder.repository import named_key
from tests.trust_env import USER_PIN, SoftHsm, sign, threshold_repo


def run(*argv: str) -> int:
    return main(list(argv))


def test_key_generated_in_the_token_signs_a_release_with_a_file_key(
        softhsm: SoftHsm, tmp_path: Path) -> None:
    token = softhsm.init_token("release-carol")
    public = generate_token_key(token, "targets")
    repo = threshold_repo(tmp_path / "repo")
    staged, _ = repo.rotate("targets", public_keys=[
        named_key(public, "carol-token"),
        named_key(load_public_key(repo.offline_dir / "targets-1.pem"), "alice")],
        threshold=2)
    sign(repo, "root-1", "root-2")
    assert repo.staged() is not None, "the new targets keys sign the targets as well"
    sign(repo, "targets-1")
    _, staged = repo.sign(token_signer(token, "targets"))
    assert staged.live

    image = tmp_path / "v1.img"
    image.write_bytes(random.Random(1).randbytes(30_000))
    manifest = publish_release(repo, image, product="acme", version="1.0.0",
                               release_counter=1, compatibility=["hw"], zstd_level=3)
    sign(repo, "targets-1")
    assert not is_live(repo, manifest)
    _, staged = repo.sign(token_signer(token, "targets"))
    assert staged.live and is_live(repo, manifest)
    targets = Metadata[Targets].from_bytes(
        (repo.metadata_dir / f"{repo.versions()['targets']}.targets.json").read_bytes())
    assert public.keyid in targets.signatures


def test_token_errors_are_clear(softhsm: SoftHsm) -> None:
    token = softhsm.init_token("t1")
    generate_token_key(token, "k")
    with pytest.raises(SigningError, match="wrong PIN"):
        token_signer(TokenConfig(token.library, "t1", "0000"), "k")
    with pytest.raises(SigningError, match="no such token"):
        token_signer(TokenConfig(token.library, "nope", USER_PIN), "k")
    with pytest.raises(SigningError, match="no EC key labelled 'other'"):
        token_signer(token, "other")
    with pytest.raises(SigningError, match="already has a key labelled"):
        generate_token_key(token, "k")
    assert "1234" not in repr(token), "the PIN is never printed"


def test_cli_generates_a_token_key_and_signs_with_it(
        softhsm: SoftHsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    softhsm.init_token("bob-token")
    pin = tmp_path / "pin"
    pin.write_text(USER_PIN + "\n")
    token_args = ["--token-library", str(softhsm.library), "--token-label", "bob-token",
                  "--key-label", "root", "--pin-file", str(pin)]
    assert run("seeder", "key", "generate", str(tmp_path / "bob"), *token_args) == 0
    assert (tmp_path / "bob.pub.pem").is_file() and not (tmp_path / "bob.pem").exists()
    repo = tmp_path / "repo"
    assert run("seeder", "init", str(repo), "--root-keys", "2", "--root-threshold", "1") == 0
    assert run("seeder", "rotate", str(repo), "--role", "root",
               "--key", f"bob={tmp_path / 'bob.pub.pem'}", "--threshold", "1") == 0
    assert run("seeder", "sign", str(repo), "--key", str(repo / "offline" / "root-1.pem")) == 0
    capsys.readouterr()
    assert run("seeder", "sign", str(repo), *token_args) == 0
    assert "LIVE: root version 2" in capsys.readouterr().out
    assert load_private_key(repo / "offline" / "root-2.pem")  # the unused old key file
