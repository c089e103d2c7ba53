"""Intel DCAP ECDSA quotes: the byte layout, parsed and written in one place.

Layouts (all integers little-endian; offsets from the start of the quote):

    header            48 bytes   version u16, att_key_type u16, tee_type u32, qe_svn u16,
                                 pce_svn u16, qe_vendor_id[16], user_data[20]
    body              v3: SGX report body (384) at 48
                      v4: TD report 1.0 (584) at 48, or an SGX report body if tee_type is SGX
                      v5: body_type u16 @48, body_size u32 @50, body @54
                          (1 = SGX 384, 2 = TD 1.0 584, 3 = TD 1.5 648)
    sig_data_len      u32 right after the body; the signed region is everything before it
    signature data    v3: sig[64] att_key[64] qe_report[384] qe_report_sig[64]
                          qe_auth_len u16, qe_auth, cert_type u16, cert_len u32, cert_data
                      v4/v5: sig[64] att_key[64], then certification data of type 6 whose
                          payload is the v3 tail from qe_report on (with its own type 5 chain)

Real TDX buffers carry zero padding after the signature data, so quotes are parsed by their
length fields; anything after the signature data must be zero. Every structural problem raises
`QuoteFormatError` naming the field and its offset.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from modelyo.errors import QuoteFormatError
from modelyo.tee.provider import Tee

HEADER_SIZE = 48
SGX_REPORT_BODY_SIZE = 384
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
ECDSA_SIGNATURE_SIZE = 64
ECDSA_KEY_SIZE = 64
# configfs-tsm caps a quote at 32 KiB (TSM_REPORT_OUTBLOB_MAX); real quotes are about 5 KiB.
MAX_QUOTE_SIZE = 32 * 1024

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
ATT_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081

CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6

BODY_TYPE_SGX = 1
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
_V5_BODY_SIZES = {
    BODY_TYPE_SGX: SGX_REPORT_BODY_SIZE,
    BODY_TYPE_TD10: TD_REPORT10_SIZE,
    BODY_TYPE_TD15: TD_REPORT15_SIZE,
}

SGX_ATTRIBUTE_DEBUG = 1 << 1
TD_ATTRIBUTE_DEBUG = 1 << 0
TD_ATTRIBUTE_SEPT_VE_DISABLE = 1 << 28

_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_HEX_TEXT = re.compile(rb"^(0x)?[0-9a-fA-F\s]+$")


class _Reader:
    """A bounds-checked cursor: every short read names the field it was reading."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.offset = offset
        self.end = len(data) if end is None else end

    def take(self, size: int, name: str) -> bytes:
        if size < 0 or self.offset + size > self.end:
            raise QuoteFormatError(
                f"needs {size} bytes but only {max(self.end - self.offset, 0)} remain",
                field=name,
                offset=self.offset,
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "little")

    def u32(self, name: str) -> int:
        return int.from_bytes(self.take(4, name), "little")


def _fixed(value: bytes, size: int, name: str) -> bytes:
    # Serialising a wrongly sized field would silently shift every later offset.
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    @property
    def tee(self) -> Tee:
        return Tee.TDX if self.tee_type == TEE_TYPE_TDX else Tee.SGX

    def to_bytes(self) -> bytes:
        return (
            struct.pack(
                "<HHIHH", self.version, self.att_key_type, self.tee_type, self.qe_svn, self.pce_svn
            )
            + _fixed(self.qe_vendor_id, 16, "qe_vendor_id")
            + _fixed(self.user_data, 20, "user_data")
        )

    @classmethod
    def parse(cls, r: _Reader) -> QuoteHeader:
        start = r.offset
        version = r.u16("header.version")
        if version not in (3, 4, 5):
            raise QuoteFormatError(
                f"version {version} is not a DCAP quote version (3 = SGX, 4 or 5 = TDX)",
                field="header.version",
                offset=start,
            )
        att_key_type = r.u16("header.att_key_type")
        if att_key_type != ATT_KEY_TYPE_ECDSA_P256:
            raise QuoteFormatError(
                f"attestation key type {att_key_type} is not supported (only 2, ECDSA P-256)",
                field="header.att_key_type",
                offset=start + 2,
            )
        tee_type = r.u32("header.tee_type")
        valid = (TEE_TYPE_SGX,) if version == 3 else (TEE_TYPE_SGX, TEE_TYPE_TDX)
        if tee_type not in valid:
            raise QuoteFormatError(
                f"TEE type {tee_type:#x} is not valid for a version {version} quote",
                field="header.tee_type",
                offset=start + 4,
            )
        return cls(
            version=version,
            att_key_type=att_key_type,
            tee_type=tee_type,
            qe_svn=r.u16("header.qe_svn"),
            pce_svn=r.u16("header.pce_svn"),
            qe_vendor_id=r.take(16, "header.qe_vendor_id"),
            user_data=r.take(20, "header.user_data"),
        )


@dataclass(frozen=True)
class SgxReportBody:
    """An SGX enclave report body (384 bytes): the quoted enclave, or the QE's own report."""

    cpu_svn: bytes = bytes(16)
    misc_select: int = 0
    isv_ext_prod_id: bytes = bytes(16)
    attributes: bytes = bytes(16)
    mr_enclave: bytes = bytes(32)
    mr_signer: bytes = bytes(32)
    config_id: bytes = bytes(64)
    isv_prod_id: int = 0
    isv_svn: int = 0
    config_svn: int = 0
    isv_family_id: bytes = bytes(16)
    report_data: bytes = bytes(64)
    # Reserved areas are kept as read, so that parsing and encoding round-trip exactly.
    reserved1: bytes = bytes(12)
    reserved2: bytes = bytes(32)
    reserved3: bytes = bytes(32)
    reserved4: bytes = bytes(42)

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.attributes[:8], "little") & SGX_ATTRIBUTE_DEBUG)

    def to_bytes(self) -> bytes:
        return b"".join(
            [
                _fixed(self.cpu_svn, 16, "cpu_svn"),
                struct.pack("<I", self.misc_select),
                _fixed(self.reserved1, 12, "reserved1"),
                _fixed(self.isv_ext_prod_id, 16, "isv_ext_prod_id"),
                _fixed(self.attributes, 16, "attributes"),
                _fixed(self.mr_enclave, 32, "mr_enclave"),
                _fixed(self.reserved2, 32, "reserved2"),
                _fixed(self.mr_signer, 32, "mr_signer"),
                _fixed(self.reserved3, 32, "reserved3"),
                _fixed(self.config_id, 64, "config_id"),
                struct.pack("<HHH", self.isv_prod_id, self.isv_svn, self.config_svn),
                _fixed(self.reserved4, 42, "reserved4"),
                _fixed(self.isv_family_id, 16, "isv_family_id"),
                _fixed(self.report_data, 64, "report_data"),
            ]
        )

    @classmethod
    def parse(cls, r: _Reader, name: str = "sgx_report") -> SgxReportBody:
        r.take(SGX_REPORT_BODY_SIZE, name)  # bounds check for the whole body first
        r.offset -= SGX_REPORT_BODY_SIZE
        cpu_svn = r.take(16, f"{name}.cpu_svn")
        misc_select = r.u32(f"{name}.misc_select")
        reserved1 = r.take(12, f"{name}.reserved1")
        isv_ext_prod_id = r.take(16, f"{name}.isv_ext_prod_id")
        attributes = r.take(16, f"{name}.attributes")
        mr_enclave = r.take(32, f"{name}.mr_enclave")
        reserved2 = r.take(32, f"{name}.reserved2")
        mr_signer = r.take(32, f"{name}.mr_signer")
        reserved3 = r.take(32, f"{name}.reserved3")
        config_id = r.take(64, f"{name}.config_id")
        isv_prod_id = r.u16(f"{name}.isv_prod_id")
        isv_svn = r.u16(f"{name}.isv_svn")
        config_svn = r.u16(f"{name}.config_svn")
        reserved4 = r.take(42, f"{name}.reserved4")
        isv_family_id = r.take(16, f"{name}.isv_family_id")
        report_data = r.take(64, f"{name}.report_data")
        return cls(
            cpu_svn=cpu_svn,
            misc_select=misc_select,
            isv_ext_prod_id=isv_ext_prod_id,
            attributes=attributes,
            mr_enclave=mr_enclave,
            mr_signer=mr_signer,
            config_id=config_id,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            config_svn=config_svn,
            isv_family_id=isv_family_id,
            report_data=report_data,
            reserved1=reserved1,
            reserved2=reserved2,
            reserved3=reserved3,
            reserved4=reserved4,
        )


@dataclass(frozen=True)
class TdReportBody:
    """A TD report body: TD 1.0 (584 bytes), or TD 1.5 (648) when the last two fields are set."""

    tee_tcb_svn: bytes = bytes(16)
    mr_seam: bytes = bytes(48)
    mr_signer_seam: bytes = bytes(48)
    seam_attributes: bytes = bytes(8)
    td_attributes: bytes = bytes(8)
    xfam: bytes = bytes(8)
    mr_td: bytes = bytes(48)
    mr_config_id: bytes = bytes(48)
    mr_owner: bytes = bytes(48)
    mr_owner_config: bytes = bytes(48)
    rtmr0: bytes = bytes(48)
    rtmr1: bytes = bytes(48)
    rtmr2: bytes = bytes(48)
    rtmr3: bytes = bytes(48)
    report_data: bytes = bytes(64)
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    _FIELDS48 = (
        "mr_td",
        "mr_config_id",
        "mr_owner",
        "mr_owner_config",
        "rtmr0",
        "rtmr1",
        "rtmr2",
        "rtmr3",
    )

    @property
    def is_td15(self) -> bool:
        return self.tee_tcb_svn2 is not None

    @property
    def debug(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") & TD_ATTRIBUTE_DEBUG)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") & TD_ATTRIBUTE_SEPT_VE_DISABLE)

    def to_bytes(self) -> bytes:
        out = [
            _fixed(self.tee_tcb_svn, 16, "tee_tcb_svn"),
            _fixed(self.mr_seam, 48, "mr_seam"),
            _fixed(self.mr_signer_seam, 48, "mr_signer_seam"),
            _fixed(self.seam_attributes, 8, "seam_attributes"),
            _fixed(self.td_attributes, 8, "td_attributes"),
            _fixed(self.xfam, 8, "xfam"),
            *(_fixed(getattr(self, name), 48, name) for name in self._FIELDS48),
            _fixed(self.report_data, 64, "report_data"),
        ]
        if self.is_td15:
            out.append(_fixed(self.tee_tcb_svn2 or b"", 16, "tee_tcb_svn2"))
            out.append(_fixed(self.mr_service_td or b"", 48, "mr_service_td"))
        return b"".join(out)

    @classmethod
    def parse(cls, r: _Reader, *, td15: bool, name: str = "td_report") -> TdReportBody:
        size = TD_REPORT15_SIZE if td15 else TD_REPORT10_SIZE
        r.take(size, name)
        r.offset -= size
        values: dict[str, Any] = {
            "tee_tcb_svn": r.take(16, f"{name}.tee_tcb_svn"),
            "mr_seam": r.take(48, f"{name}.mr_seam"),
            "mr_signer_seam": r.take(48, f"{name}.mr_signer_seam"),
            "seam_attributes": r.take(8, f"{name}.seam_attributes"),
            "td_attributes": r.take(8, f"{name}.td_attributes"),
            "xfam": r.take(8, f"{name}.xfam"),
        }
        for field_name in cls._FIELDS48:
            values[field_name] = r.take(48, f"{name}.{field_name}")
        values["report_data"] = r.take(64, f"{name}.report_data")
        if td15:
            values["tee_tcb_svn2"] = r.take(16, f"{name}.tee_tcb_svn2")
            values["mr_service_td"] = r.take(48, f"{name}.mr_service_td")
        return cls(**values)


@dataclass(frozen=True)
class SignatureData:
    """The quote's ECDSA signature data ("auth data") with the QE report and the PCK chain."""

    signature: bytes
    attestation_key: bytes
    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes

    def pck_chain_pem(self) -> list[bytes]:
        """The PEM certificates of the PCK chain, leaf first (empty for other cert types)."""
        if self.cert_type != CERT_TYPE_PCK_CHAIN:
            return []
        return _PEM_BLOCK.findall(self.cert_data)

    def _qe_part(self) -> bytes:
        return b"".join(
            [
                self.qe_report.to_bytes(),
                _fixed(self.qe_report_signature, 64, "qe_report_signature"),
                struct.pack("<H", len(self.qe_auth_data)),
                self.qe_auth_data,
                struct.pack("<HI", self.cert_type, len(self.cert_data)),
                self.cert_data,
            ]
        )

    def to_bytes(self, version: int) -> bytes:
        head = _fixed(self.signature, 64, "signature") + _fixed(
            self.attestation_key, 64, "attestation_key"
        )
        qe_part = self._qe_part()
        if version == 3:
            return head + qe_part
        return head + struct.pack("<HI", CERT_TYPE_QE_REPORT, len(qe_part)) + qe_part

    @classmethod
    def parse(cls, r: _Reader, version: int) -> SignatureData:
        signature = r.take(ECDSA_SIGNATURE_SIZE, "signature_data.signature")
        attestation_key = r.take(ECDSA_KEY_SIZE, "signature_data.attestation_key")
        if version != 3:
            at = r.offset
            outer_type = r.u16("signature_data.certification_type")
            if outer_type != CERT_TYPE_QE_REPORT:
                raise QuoteFormatError(
                    f"certification data type {outer_type}, expected {CERT_TYPE_QE_REPORT} "
                    "(QE report certification data) in a version 4/5 quote",
                    field="signature_data.certification_type",
                    offset=at,
                )
            at = r.offset
            outer_size = r.u32("signature_data.certification_size")
            inner_end = r.offset + outer_size
            if inner_end > r.end:
                raise QuoteFormatError(
                    f"certification data size {outer_size} runs past the signature data",
                    field="signature_data.certification_size",
                    offset=at,
                )
            inner = _Reader(r.data, r.offset, inner_end)
            parsed = cls._parse_qe_part(inner, signature, attestation_key)
            if inner.offset != inner_end:
                raise QuoteFormatError(
                    f"certification data declares {outer_size} bytes but its contents end "
                    f"{inner_end - inner.offset} bytes earlier",
                    field="signature_data.certification_size",
                    offset=at,
                )
            r.offset = inner_end
            return parsed
        return cls._parse_qe_part(r, signature, attestation_key)

    @classmethod
    def _parse_qe_part(cls, r: _Reader, signature: bytes, attestation_key: bytes) -> SignatureData:
        qe_report = SgxReportBody.parse(r, "qe_report")
        qe_report_signature = r.take(ECDSA_SIGNATURE_SIZE, "qe_report_signature")
        auth_size = r.u16("qe_auth_data.size")
        qe_auth_data = r.take(auth_size, "qe_auth_data")
        cert_type = r.u16("qe_certification.type")
        cert_size = r.u32("qe_certification.size")
        cert_data = r.take(cert_size, "qe_certification.data")
        return cls(
            signature=signature,
            attestation_key=attestation_key,
            qe_report=qe_report,
            qe_report_signature=qe_report_signature,
            qe_auth_data=qe_auth_data,
            cert_type=cert_type,
            cert_data=cert_data,
        )


@dataclass(frozen=True)
class Quote:
    """A parsed DCAP quote. `raw` holds exactly the quote's bytes, without trailing padding."""

    header: QuoteHeader
    body: SgxReportBody | TdReportBody
    signature_data: SignatureData
    body_type: int | None = None
    raw: bytes = field(default=b"", repr=False)
    signed_size: int = 0

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def tee(self) -> Tee:
        return Tee.TDX if isinstance(self.body, TdReportBody) else Tee.SGX

    @property
    def report_data(self) -> bytes:
        return self.body.report_data

    @property
    def debug(self) -> bool:
        return self.body.debug

    @property
    def signed_region(self) -> bytes:
        """The bytes the attestation key signs: header and body (v5: with type and size)."""
        return self.raw[: self.signed_size]

    def measurements(self) -> dict[str, str]:
        """The identity registers a policy pins, as lowercase hex."""
        b = self.body
        if isinstance(b, SgxReportBody):
            return {
                "mrenclave": b.mr_enclave.hex(),
                "mrsigner": b.mr_signer.hex(),
                "isv_prod_id": str(b.isv_prod_id),
                "isv_svn": str(b.isv_svn),
            }
        return {
            "mrtd": b.mr_td.hex(),
            "rtmr0": b.rtmr0.hex(),
            "rtmr1": b.rtmr1.hex(),
            "rtmr2": b.rtmr2.hex(),
            "rtmr3": b.rtmr3.hex(),
            "mrconfigid": b.mr_config_id.hex(),
            "mrowner": b.mr_owner.hex(),
            "mrownerconfig": b.mr_owner_config.hex(),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view: every byte field as lowercase hex."""
        sig = self.signature_data
        return _hexify(
            {
                "version": self.version,
                "tee": str(self.tee),
                "body_type": self.body_type,
                "size": len(self.raw),
                "header": asdict(self.header),
                "body": _public(asdict(self.body)),
                "debug": self.debug,
                "signature_data": {
                    "signature": sig.signature,
                    "attestation_key": sig.attestation_key,
                    "qe_report": _public(asdict(sig.qe_report)),
                    "qe_report_signature": sig.qe_report_signature,
                    "qe_auth_data": sig.qe_auth_data,
                    "cert_type": sig.cert_type,
                    "pck_chain_pem": [c.decode("ascii") for c in sig.pck_chain_pem()],
                },
            }
        )


def _public(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None and not k.startswith("reserved")}


def _hexify(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _hexify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hexify(v) for v in value]
    return value


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP quote (v3, v4 or v5) by its length fields.

    Trailing zero padding (as configfs-tsm returns it) is accepted and dropped; anything else
    that does not fit the layout raises `QuoteFormatError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"a quote is bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_QUOTE_SIZE:
        raise QuoteFormatError(
            f"{len(data)} bytes is larger than any DCAP quote (at most {MAX_QUOTE_SIZE})",
            field="quote",
            offset=MAX_QUOTE_SIZE,
        )
    r = _Reader(data)
    header = QuoteHeader.parse(r)
    body_type: int | None = None
    if header.version == 5:
        at = r.offset
        body_type = r.u16("body.type")
        if body_type not in _V5_BODY_SIZES:
            raise QuoteFormatError(
                f"body type {body_type} is not supported (1 = SGX, 2 = TD 1.0, 3 = TD 1.5)",
                field="body.type",
                offset=at,
            )
        expected_tee = TEE_TYPE_SGX if body_type == BODY_TYPE_SGX else TEE_TYPE_TDX
        if header.tee_type != expected_tee:
            raise QuoteFormatError(
                f"body type {body_type} contradicts the header's TEE type {header.tee_type:#x}",
                field="body.type",
                offset=at,
            )
        at = r.offset
        body_size = r.u32("body.size")
        if body_size != _V5_BODY_SIZES[body_type]:
            raise QuoteFormatError(
                f"body size {body_size} does not match body type {body_type} "
                f"({_V5_BODY_SIZES[body_type]} bytes)",
                field="body.size",
                offset=at,
            )
    body: SgxReportBody | TdReportBody
    if header.tee_type == TEE_TYPE_SGX:
        body = SgxReportBody.parse(r, "sgx_report")
    else:
        body = TdReportBody.parse(r, td15=body_type == BODY_TYPE_TD15)
    signed_size = r.offset
    at = r.offset
    sig_len = r.u32("signature_data.size")
    sig_end = r.offset + sig_len
    if sig_end > len(data):
        raise QuoteFormatError(
            f"signature data size {sig_len} runs past the end of the quote "
            f"({len(data) - r.offset} bytes remain)",
            field="signature_data.size",
            offset=at,
        )
    sig_reader = _Reader(data, r.offset, sig_end)
    signature_data = SignatureData.parse(sig_reader, header.version)
    if sig_reader.offset != sig_end:
        raise QuoteFormatError(
            f"signature data declares {sig_len} bytes but its contents end "
            f"{sig_end - sig_reader.offset} bytes earlier",
            field="signature_data.size",
            offset=at,
        )
    trailing = data[sig_end:]
    if trailing.strip(b"\0"):
        first = sig_end + next(i for i, b in enumerate(trailing) if b)
        raise QuoteFormatError(
            "data after the signature data is not zero padding",
            field="trailing",
            offset=first,
        )
    return Quote(
        header=header,
        body=body,
        signature_data=signature_data,
        body_type=body_type,
        raw=data[:sig_end],
        signed_size=signed_size,
    )


def encode_signed_region(
    header: QuoteHeader, body: SgxReportBody | TdReportBody, *, body_type: int | None = None
) -> bytes:
    """Header and body as the attestation key signs them (v5 inserts body type and size)."""
    body_bytes = body.to_bytes()
    if header.version == 5:
        if body_type is None:
            raise ValueError("a version 5 quote needs a body_type")
        return header.to_bytes() + struct.pack("<HI", body_type, len(body_bytes)) + body_bytes
    return header.to_bytes() + body_bytes


def encode_quote(signed_region: bytes, signature_data: SignatureData, version: int) -> bytes:
    """Assemble a quote from its signed region and its signature data."""
    sig = signature_data.to_bytes(version)
    return signed_region + struct.pack("<I", len(sig)) + sig


def qe_report_data(attestation_key: bytes, qe_auth_data: bytes) -> bytes:
    """The QE's REPORTDATA: SHA-256(attestation key || QE auth data) padded with 32 zeros."""
    return hashlib.sha256(attestation_key + qe_auth_data).digest() + bytes(32)


def quote_from_file_bytes(data: bytes) -> bytes:
    """Accept a quote as raw bytes or as hex text (optional 0x prefix, whitespace ignored)."""
    if data and _HEX_TEXT.match(data.strip() or b"x"):
        text = re.sub(rb"\s+", b"", data.strip())
        if text[:2].lower() == b"0x":
            text = text[2:]
        if len(text) % 2:
            raise QuoteFormatError("hex text has an odd number of digits", field="hex", offset=0)
        return bytes.fromhex(text.decode("ascii"))
    return data
