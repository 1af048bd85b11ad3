"""verify_chain checks links, payload digests and commit certificates."""

from __future__ import annotations

from consensus.ledger import Block, CommitCertificate, verify_chain

from .chain_fixtures import N, certify, keyring, make_chain


def test_valid_chain_verifies() -> None:
    keys = keyring()
    chain = make_chain(5, keys)
    verdict = verify_chain(chain, verify=keys.verify, n=N, f=1)
    assert verdict.ok and verdict.verified == 5


def test_tampered_payload_is_named_by_height() -> None:
    keys = keyring()
    chain = make_chain(5, keys)
    bad = chain[2]
    chain[2] = Block(bad.header, bad.payload + b"x", certificate=bad.certificate)
    verdict = verify_chain(chain, verify=keys.verify, n=N, f=1)
    assert (verdict.first_bad_height, verdict.verified) == (3, 2)
    assert "payload" in verdict.reason


def test_broken_link_is_named_by_height() -> None:
    keys = keyring()
    chain = make_chain(5, keys)
    del chain[1]
    verdict = verify_chain(chain, verify=keys.verify, n=N, f=1)
    assert verdict.first_bad_height == 2


def test_certificate_with_too_few_signers_is_rejected() -> None:
    keys = keyring()
    chain = make_chain(3, keys)
    chain[1] = certify(Block(chain[1].header, chain[1].payload), keys, signers=(0, 1))
    assert verify_chain(chain, verify=keys.verify, n=N, f=1).first_bad_height == 2


def test_certificate_never_counts_a_signer_twice() -> None:
    keys = keyring()
    chain = make_chain(1, keys)
    cert = chain[0].certificate
    assert cert is not None
    doubled = CommitCertificate(
        view=0,
        height=1,
        digest=cert.digest,
        signatures=[cert.signatures[0], cert.signatures[0], cert.signatures[1]],
    )
    chain[0] = chain[0].with_certificate(doubled)
    assert verify_chain(chain, verify=keys.verify, n=N, f=1).first_bad_height == 1


def test_certificate_signed_by_wrong_key_is_rejected() -> None:
    keys = keyring()
    chain = make_chain(1, keys)
    cert = chain[0].certificate
    assert cert is not None
    forged = [(signer, keys.signer(3)(b"whatever")) for signer, _ in cert.signatures]
    chain[0] = chain[0].with_certificate(
        CommitCertificate(view=0, height=1, digest=cert.digest, signatures=forged)
    )
    assert verify_chain(chain, verify=keys.verify, n=N, f=1).first_bad_height == 1


def test_missing_certificate_is_rejected() -> None:
    keys = keyring()
    chain = make_chain(2, keys)
    chain[1] = Block(chain[1].header, chain[1].payload)
    verdict = verify_chain(chain, verify=keys.verify, n=N, f=1)
    assert verdict.first_bad_height == 2 and "certificate" in verdict.reason
