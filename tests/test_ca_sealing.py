"""Sealing the CA's state: only the same CA build on the same platform unseals it."""

from __future__ import annotations

import hashlib

import pytest

from ca_enclave.sealing import (
    HEADER_SIZE,
    MAGIC,
    GramineSealer,
    SealedElsewhereError,
    SimulatedSealer,
)
from modelyo.errors import StateError
from modelyo.tee.sim import SimulatedPlatform

MRENCLAVE = hashlib.sha256(b"ca build 1").digest()
OTHER_MRENCLAVE = hashlib.sha256(b"ca build 2").digest()
SECRET = b"the CA's sealed state: root key, master keys"


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    return SimulatedPlatform(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def other_platform(tmp_path_factory):
    return SimulatedPlatform(tmp_path_factory.mktemp("sim-other"))


def test_round_trip_and_the_blob_hides_the_data(platform):
    sealer = SimulatedSealer(platform, MRENCLAVE)
    blob = sealer.seal(SECRET, purpose="state")
    assert blob.startswith(MAGIC)
    assert SECRET not in blob
    assert sealer.unseal(blob, purpose="state", where="dir") == SECRET
    # A second sealer with the same identity (a restart) unseals it too.
    assert SimulatedSealer(platform, MRENCLAVE).unseal(blob, purpose="state", where="d") == SECRET
    # Fresh nonce each time.
    assert sealer.seal(SECRET, purpose="state") != blob


def test_another_measurement_is_refused_with_a_message_that_says_what_to_do(platform):
    blob = SimulatedSealer(platform, MRENCLAVE).seal(SECRET, purpose="state")
    other = SimulatedSealer(platform, OTHER_MRENCLAVE)
    with pytest.raises(SealedElsewhereError) as caught:
        other.unseal(blob, purpose="state", where="/srv/ca")
    message = str(caught.value)
    assert "state in /srv/ca was sealed by another CA build or platform" in message
    assert f"sealed for SIMULATED platform, MRENCLAVE {MRENCLAVE.hex()[:16]}" in message
    assert f"this CA is SIMULATED platform, MRENCLAVE {OTHER_MRENCLAVE.hex()[:16]}" in message
    assert "restore the matching CA build, or start with a new --state-dir" in message
    assert "another CA build)" in message


def test_another_platform_is_refused(platform, other_platform):
    blob = SimulatedSealer(platform, MRENCLAVE).seal(SECRET, purpose="state")
    with pytest.raises(SealedElsewhereError, match="same MRENCLAVE: another platform"):
        SimulatedSealer(other_platform, MRENCLAVE).unseal(blob, purpose="state", where="d")


@pytest.mark.parametrize(
    "position",
    [HEADER_SIZE - 40, HEADER_SIZE + 3, HEADER_SIZE + 20, -1],
    ids=["mrenclave-in-header", "nonce", "ciphertext", "tag"],
)
def test_a_changed_byte_is_refused_as_tampering(platform, position):
    sealer = SimulatedSealer(platform, MRENCLAVE)
    blob = bytearray(sealer.seal(SECRET, purpose="state"))
    blob[position] ^= 0x01
    with pytest.raises(StateError, match="failed authentication") as caught:
        sealer.unseal(bytes(blob), purpose="state", where="d")
    assert not isinstance(caught.value, SealedElsewhereError)


def test_truncation_wrong_purpose_and_garbage_are_refused(platform):
    sealer = SimulatedSealer(platform, MRENCLAVE)
    blob = sealer.seal(SECRET, purpose="state")
    with pytest.raises(StateError, match="failed authentication"):
        sealer.unseal(blob[:-5], purpose="state", where="d")
    with pytest.raises(StateError, match="swapped with another sealed file"):
        sealer.unseal(blob, purpose="owner", where="d")
    with pytest.raises(StateError, match="not a Modelyo sealed file"):
        sealer.unseal(b"{}" * 100, purpose="state", where="d")
    with pytest.raises(StateError, match="not a Modelyo sealed file"):
        sealer.unseal(blob[:HEADER_SIZE], purpose="state", where="d")
    future = bytearray(blob)
    future[len(MAGIC)] = 2
    with pytest.raises(StateError, match="format version 2"):
        sealer.unseal(bytes(future), purpose="state", where="d")


def _fake_gramine(root, key: bytes, mrenclave: bytes = MRENCLAVE):
    (root / "keys").mkdir(parents=True, exist_ok=True)
    (root / "keys" / "_sgx_mrenclave").write_bytes(key)
    (root / "my_target_info").write_bytes(mrenclave + bytes(480))
    (root / "attestation_type").write_text("dcap")
    return root


def test_gramine_sealer_uses_the_mrenclave_key_and_reads_the_measurement(tmp_path):
    root = _fake_gramine(tmp_path / "attestation", bytes(range(16)))
    sealer = GramineSealer(root)
    assert sealer.mrenclave == MRENCLAVE
    assert not sealer.simulated
    blob = sealer.seal(SECRET, purpose="state")
    assert GramineSealer(root).unseal(blob, purpose="state", where="d") == SECRET
    assert "SGX enclave (Gramine)" in sealer.describe()


def test_gramine_sealer_refuses_another_cpu_or_build(tmp_path, platform):
    blob = GramineSealer(_fake_gramine(tmp_path / "a", bytes(range(16)))).seal(
        SECRET, purpose="state"
    )
    other_cpu = GramineSealer(_fake_gramine(tmp_path / "b", bytes(range(1, 17))))
    with pytest.raises(SealedElsewhereError, match="SGX enclave \\(Gramine\\)"):
        other_cpu.unseal(blob, purpose="state", where="d")
    other_build = GramineSealer(_fake_gramine(tmp_path / "c", bytes(range(16)), OTHER_MRENCLAVE))
    with pytest.raises(SealedElsewhereError):
        other_build.unseal(blob, purpose="state", where="d")
    # Simulated and hardware sealing never read each other's blobs.
    with pytest.raises(SealedElsewhereError, match="sealed for SGX enclave"):
        SimulatedSealer(platform, MRENCLAVE).unseal(blob, purpose="state", where="d")


def test_gramine_sealer_says_what_is_missing(tmp_path):
    with pytest.raises(StateError, match="run the CA inside an SGX enclave with gramine-sgx"):
        GramineSealer(tmp_path / "nothing")
    root = _fake_gramine(tmp_path / "short", bytes(8))
    with pytest.raises(StateError, match="is 8 bytes, expected 16"):
        GramineSealer(root)
