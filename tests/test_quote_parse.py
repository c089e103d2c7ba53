"""The DCAP quote parser against real Intel quotes, dcap-qvl's own parser, and hostile input."""

from __future__ import annotations

import struct

import dcap_qvl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelyo.attestation.quote import (
    MAX_QUOTE_SIZE,
    SgxReportBody,
    TdReportBody,
    encode_quote,
    encode_signed_region,
    parse_quote,
    qe_report_data,
    quote_from_file_bytes,
)
from modelyo.errors import QuoteFormatError
from tests.vectors import ALL, BY_NAME


@pytest.mark.parametrize("vector", ALL, ids=lambda v: v.name)
def test_vectors_parse_with_version_and_tee(vector):
    quote = parse_quote(vector.raw)
    assert quote.version == vector.version
    assert quote.tee == vector.tee
    assert not quote.debug
    # Every real quote carries a PCK chain: leaf, intermediate, Intel root.
    chain = quote.signature_data.pck_chain_pem()
    assert len(chain) == 3
    assert b"Intel SGX Root CA" in __import__("base64").b64decode(
        b"".join(chain[2].splitlines()[1:-1])
    )


def test_sgx_vector_fields_match_its_readme():
    quote = parse_quote(BY_NAME["sgx_quote"].raw)
    assert isinstance(quote.body, SgxReportBody)
    assert quote.body.mr_enclave.hex() == (
        "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
    )
    assert quote.body.mr_signer.hex() == (
        "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
    )
    assert quote.report_data.startswith(b"Hello, world!")
    assert dcap_qvl.parse_quote(quote.raw).fmspc().upper() == "00A067110000"


def test_tdx_vector_fields_match_its_readme():
    raw = BY_NAME["tdx_quote"].raw
    quote = parse_quote(raw)
    assert isinstance(quote.body, TdReportBody)
    assert quote.body.mr_td.hex() == (
        "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
        "de03ae6dc5f87f27428b2538873118b7"
    )
    assert quote.body.rtmr3 == bytes(48)
    assert dcap_qvl.parse_quote(raw).fmspc().upper() == "B0C06F000000"
    # The file is a 5006-byte buffer; the quote ends where its length fields say.
    assert len(raw) == 5006
    assert len(quote.raw) < len(raw)
    assert raw[len(quote.raw) :] == bytes(len(raw) - len(quote.raw))


def test_v5_vector_is_a_td15_body():
    quote = parse_quote(BY_NAME["tdx_quote_outdated"].raw)
    assert quote.body_type == 3
    assert isinstance(quote.body, TdReportBody) and quote.body.is_td15
    assert quote.signed_size == 48 + 6 + 648


@pytest.mark.parametrize("vector", ALL, ids=lambda v: v.name)
def test_fields_agree_with_dcap_qvl(vector):
    ours = parse_quote(vector.raw)
    theirs = dcap_qvl.parse_quote(vector.raw)
    assert ours.header.version == theirs.header.version
    assert ours.header.tee_type == theirs.header.tee_type
    assert ours.header.qe_vendor_id == bytes(theirs.header.qe_vendor_id)
    assert ours.header.user_data == bytes(theirs.header.user_data)
    report = theirs.report
    assert ours.report_data == bytes(report.report_data)
    if isinstance(ours.body, SgxReportBody):
        assert ours.body.mr_enclave == bytes(report.mr_enclave)
        assert ours.body.mr_signer == bytes(report.mr_signer)
        assert ours.body.attributes == bytes(report.attributes)
    else:
        assert ours.body.mr_td == bytes(report.mr_td)
        assert ours.body.td_attributes == bytes(report.td_attributes)
        rtmrs = (report.rt_mr0, report.rt_mr1, report.rt_mr2, report.rt_mr3)
        for i, value in enumerate(rtmrs):
            assert getattr(ours.body, f"rtmr{i}") == bytes(value)
    pem = b"".join(ours.signature_data.pck_chain_pem())
    assert pem.replace(b"\n", b"") in bytes(theirs.cert_chain_pem_bytes()).replace(b"\n", b"")


@pytest.mark.parametrize("vector", ALL, ids=lambda v: v.name)
def test_encode_round_trips_byte_exact(vector):
    quote = parse_quote(vector.raw)
    region = encode_signed_region(quote.header, quote.body, body_type=quote.body_type)
    assert region == quote.signed_region
    assert encode_quote(region, quote.signature_data, quote.version) == quote.raw
    sig = quote.signature_data
    # The QE binds the attestation key: the same rule the simulator uses to build quotes.
    expected = qe_report_data(sig.attestation_key, sig.qe_auth_data)
    assert sig.qe_report.report_data[:32] == expected[:32]


def test_hex_text_is_accepted():
    vector = BY_NAME["tdx_quote_2"]
    text = (vector.raw.hex()).encode()
    assert quote_from_file_bytes(text) == vector.raw
    assert quote_from_file_bytes(b"0x" + text + b"\n") == vector.raw
    with pytest.raises(QuoteFormatError, match="odd number"):
        quote_from_file_bytes(b"abc")


@pytest.mark.parametrize("vector", ALL, ids=lambda v: v.name)
def test_every_truncation_is_refused_with_field_and_offset(vector):
    end = len(parse_quote(vector.raw).raw)
    for cut in range(end):
        with pytest.raises(QuoteFormatError) as info:
            parse_quote(vector.raw[:cut])
        assert 0 <= info.value.offset <= cut
        assert info.value.field


def test_oversized_input_is_refused():
    raw = BY_NAME["sgx_quote"].raw
    with pytest.raises(QuoteFormatError, match="larger than any DCAP quote") as info:
        parse_quote(raw + bytes(MAX_QUOTE_SIZE))
    assert info.value.field == "quote"


def test_non_zero_trailing_data_is_refused():
    raw = BY_NAME["tdx_quote"].raw
    end = len(parse_quote(raw).raw)
    bad = raw[: end + 10] + b"\x01" + raw[end + 11 :]
    with pytest.raises(QuoteFormatError) as info:
        parse_quote(bad)
    assert info.value.field == "trailing"
    assert info.value.offset == end + 10


def _patch(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize(fmt)
    return raw[:offset] + struct.pack(fmt, value) + raw[offset + size :]


@pytest.mark.parametrize(
    ("name", "offset", "fmt", "value", "field"),
    [
        ("sgx_quote", 0, "<H", 7, "header.version"),
        ("sgx_quote", 2, "<H", 3, "header.att_key_type"),
        ("sgx_quote", 4, "<I", 0x81, "header.tee_type"),  # a v3 quote cannot be TDX
        ("tdx_quote", 4, "<I", 0x42, "header.tee_type"),
        ("tdx_quote_outdated", 48, "<H", 9, "body.type"),
        ("tdx_quote_outdated", 48, "<H", 1, "body.type"),  # SGX body in a TDX header
        ("tdx_quote_outdated", 50, "<I", 584, "body.size"),
        ("tdx_quote", 632, "<I", 60000, "signature_data.size"),
        ("tdx_quote", 632 + 4 + 128, "<H", 5, "signature_data.certification_type"),
        ("tdx_quote", 632 + 4 + 128 + 2, "<I", 1 << 20, "signature_data.certification_size"),
    ],
)
def test_inconsistent_fields_are_named(name, offset, fmt, value, field):
    raw = _patch(BY_NAME[name].raw, offset, fmt, value)
    with pytest.raises(QuoteFormatError) as info:
        parse_quote(raw)
    assert info.value.field == field
    assert info.value.offset == offset
    assert field in str(info.value) and str(offset) in str(info.value)


def test_signature_data_longer_than_its_contents_is_refused():
    raw = BY_NAME["sgx_quote"].raw
    quote = parse_quote(raw)
    declared = len(quote.raw) - quote.signed_size - 4
    bad = _patch(raw, 432, "<I", declared + 8) + bytes(8)
    with pytest.raises(QuoteFormatError, match="contents end 8 bytes earlier"):
        parse_quote(bad)


# --- hostile input: nothing but QuoteFormatError may ever escape ------------------------------

_SEEDS = [v.raw for v in ALL]


def _parse_or_format_error(data: bytes) -> None:
    try:
        quote = parse_quote(data)
    except QuoteFormatError as exc:
        assert exc.field and exc.offset >= 0
    else:
        # Whatever parses must re-encode to exactly the bytes it came from.
        region = encode_signed_region(quote.header, quote.body, body_type=quote.body_type)
        assert encode_quote(region, quote.signature_data, quote.version) == quote.raw


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=6000))
def test_random_bytes_never_raise_anything_else(data):
    _parse_or_format_error(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SEEDS),
    st.lists(st.tuples(st.integers(0, 5005), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_real_quotes_never_raise_anything_else(seed, edits):
    data = bytearray(seed)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    _parse_or_format_error(bytes(data))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(_SEEDS),
    st.integers(0, 5005),
    st.integers(0, 200),
    st.binary(max_size=300),
)
def test_spliced_real_quotes_never_raise_anything_else(seed, pos, cut, insert):
    pos %= len(seed)
    _parse_or_format_error(seed[:pos] + insert + seed[pos + cut :])


def test_header_only_versions():
    # A well-formed header announcing v4 TDX, then nothing: the body is what is missing.
    raw = BY_NAME["tdx_quote"].raw[:48]
    with pytest.raises(QuoteFormatError) as info:
        parse_quote(raw)
    assert info.value.field == "td_report"
    assert info.value.offset == 48
