"""Ed25519 identities, key files and envelope checks (node/identity.py)."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from consensus.messages import Commit, Prepare
from node.identity import (
    AuthError,
    Identity,
    KeyFileError,
    load_identity,
    pbft_signer,
    pbft_verifier,
    save_identity,
    signing_tag,
    verify_envelope,
    verify_signature,
)

ROOT = Path(__file__).resolve().parents[2]

# RFC 8032 section 7.1, TEST 1: secret key, public key, signature of the empty message.
RFC_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065"
    "224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


def test_keys_follow_rfc_8032():
    # Execute
    identity = Identity(node_id="rfc", role="client", seed=RFC_SEED)
    # Assert
    assert identity.public_key == RFC_PUBLIC
    assert verify_signature(RFC_PUBLIC, b"", RFC_SIGNATURE)
    assert not verify_signature(RFC_PUBLIC, b"x", RFC_SIGNATURE)


def test_generated_keys_differ_and_never_show_the_seed():
    # Execute
    a = Identity.generate(node_id="a", role="client")
    b = Identity.generate(node_id="b", role="client")
    # Assert
    assert a.public_key != b.public_key
    assert a.seed.hex() not in repr(a)


def test_signing_tag_names_version_and_kind():
    assert signing_tag("update") == b"LLBCFL/v1/update\x00"


@pytest.mark.parametrize("kind", ["", "Update", "up\x00date", "a/b", "-x"])
def test_signing_tag_rejects_ambiguous_kinds(kind):
    with pytest.raises(ValueError, match="envelope kind"):
        signing_tag(kind)


def test_verify_envelope_returns_the_signer(identities, membership):
    # Prepare
    envelope = identities["server"].sign("start-round", b"round 1")
    # Execute
    signer = verify_envelope(
        envelope, membership, expected_kind="start-round", allowed_roles={"server"}
    )
    # Assert
    assert signer.node_id == "server"


def _reason(envelope, membership, *, kind="start-round", roles=("server",)):
    with pytest.raises(AuthError) as info:
        verify_envelope(envelope, membership, expected_kind=kind, allowed_roles=roles)
    return info.value.reason


def test_forged_signature_is_rejected(identities, membership):
    # Prepare: one flipped bit in the signature
    envelope = identities["server"].sign("start-round", b"round 1")
    envelope.signature = bytes([envelope.signature[0] ^ 1]) + envelope.signature[1:]
    # Execute / Assert
    assert _reason(envelope, membership) == "bad-signature"


def test_altered_payload_is_rejected(identities, membership):
    # Prepare
    envelope = identities["server"].sign("start-round", b"round 1")
    envelope.payload = b"round 2"
    # Execute / Assert
    assert _reason(envelope, membership) == "bad-signature"


def test_signer_outside_the_membership_is_rejected(membership):
    # Prepare: a valid signature by a key the genesis does not list
    outsider = Identity(node_id="server", role="server", seed=bytes(32))
    envelope = outsider.sign("start-round", b"round 1")
    # Execute / Assert
    assert _reason(envelope, membership) == "unknown-signer"


def test_member_with_the_wrong_role_is_rejected(identities, membership):
    # Prepare: a client sends what only the server may send
    envelope = identities["client-000"].sign("start-round", b"round 1")
    # Execute / Assert
    assert _reason(envelope, membership) == "wrong-role"


def test_signature_for_one_kind_is_not_accepted_as_another(identities, membership):
    # Prepare: signed as a "model" message, presented where "start-round" is expected
    envelope = identities["server"].sign("model", b"round 1")
    relabelled = identities["server"].sign("model", b"round 1")
    relabelled.kind = "start-round"
    # Execute / Assert
    assert _reason(envelope, membership) == "wrong-kind"
    assert _reason(relabelled, membership) == "bad-signature"


def test_pbft_callables_sign_and_verify_consensus_messages(identities, membership):
    # Prepare
    sign = pbft_signer(identities["miner-2"])
    verify = pbft_verifier(membership)
    vote = Prepare(view=0, height=1, digest=bytes(32), sender=2)
    # Execute
    vote.signature = sign(vote.signed)
    # Assert
    assert vote.is_authentic(verify)
    assert not verify(1, vote.signed, vote.signature)  # another replica's index
    assert not verify(4, vote.signed, vote.signature)  # no such replica
    assert not verify(-1, vote.signed, vote.signature)


def test_pbft_vote_signature_does_not_carry_over_to_another_phase(identities, membership):
    # Prepare
    sign = pbft_signer(identities["miner-1"])
    prepare = Prepare(view=3, height=7, digest=bytes(32), sender=1)
    commit = Commit(view=3, height=7, digest=bytes(32), sender=1, signature=sign(prepare.signed))
    # Execute / Assert
    assert not commit.is_authentic(pbft_verifier(membership))


def test_pbft_signer_refuses_untagged_bytes_and_non_miners(identities):
    # Prepare
    sign = pbft_signer(identities["miner-0"])
    # Execute / Assert
    with pytest.raises(ValueError, match="PBFT domain tag"):
        sign(signing_tag("update") + b"payload")
    with pytest.raises(ValueError, match="only miners"):
        pbft_signer(identities["server"])


def test_key_file_round_trip_with_mode_0600(tmp_path, identities):
    # Prepare
    path = tmp_path / "miner-0.key"
    # Execute
    save_identity(identities["miner-0"], path)
    loaded = load_identity(path)
    # Assert
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (loaded.node_id, loaded.role) == ("miner-0", "miner")
    assert loaded.public_key == identities["miner-0"].public_key
    assert [p.name for p in tmp_path.iterdir()] == ["miner-0.key"]  # no temporary left


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_file_readable_by_others_is_refused(tmp_path, identities, mode):
    # Prepare
    path = tmp_path / "server.key"
    save_identity(identities["server"], path)
    os.chmod(path, mode)
    # Execute / Assert
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_identity(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not = [toml", "not valid TOML"),
        ('node_id = "a"\nrole = "miner"\nseed = "00"\n', "lacks string field"),
        ('node_id = "a"\nrole = "miner"\nseed = "zz"\npublic_key = "00"\n', "bad seed"),
        (f'node_id = "a"\nrole = "boss"\nseed = "{"00" * 32}"\npublic_key = "00"\n', "bad seed"),
        (f'node_id = "a"\nrole = "miner"\nseed = "{"00" * 32}"\npublic_key = "00"\n', "match"),
        (
            f'node_id = "a"\nrole = "miner"\nseed = "{"00" * 32}"\npublic_key = "00"\nx = "1"\n',
            "unknown field",
        ),
    ],
)
def test_malformed_key_file_gives_a_clear_error(tmp_path, text, message):
    # Prepare
    path = tmp_path / "bad.key"
    path.write_text(text)
    path.chmod(0o600)
    # Execute / Assert
    with pytest.raises(KeyFileError, match=message):
        load_identity(path)


def test_missing_key_file_gives_a_clear_error(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_identity(tmp_path / "absent.key")


def _imported_roots(path: Path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    return imported


def test_only_node_identity_imports_nacl():
    # Prepare
    sources = [ROOT / "cli.py"]
    for package in ("fl", "consensus", "node", "proto", "bench"):
        sources.extend((ROOT / package).glob("*.py"))
    # Execute
    importers = {str(p.relative_to(ROOT)) for p in sources if "nacl" in _imported_roots(p)}
    # Assert
    assert importers == {"node/identity.py"}
