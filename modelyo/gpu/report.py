"""NVIDIA GPU attestation reports: the byte layout, parsed and written in one place.

What `nvmlDeviceGetConfComputeGpuAttestationReport` returns is the SPDM 1.1 (DMTF DSP0274)
GET_MEASUREMENTS request the driver sent, followed by the GPU's MEASUREMENTS response. All
integers are little-endian; offsets are from the start of the report:

    request (37 bytes)
      0   SPDMVersion u8 (0x11)      1  RequestResponseCode u8 (0xE0, GET_MEASUREMENTS)
      2   Param1 u8 (bit 0: signature requested)
      3   Param2 u8 (measurement operation; 0xFF = all measurements)
      4   Nonce[32] (the verifier's challenge: REPORTDATA[0:32] of the TD quote)
      36  SlotIDParam u8 (bits 3:0: certificate slot)
    response (from 37)
      +0  SPDMVersion u8             +1 RequestResponseCode u8 (0x60, MEASUREMENTS)
      +2  Param1 u8                  +3 Param2 u8 (bits 3:0: slot)
      +4  NumberOfBlocks u8          +5 MeasurementRecordLength u24
      +8  MeasurementRecord: NumberOfBlocks measurement blocks, each
              Index u8, MeasurementSpecification u8 (bit 0 = DMTF), MeasurementSize u16,
              DMTF measurement: ValueType u8 (bit 7: raw bit stream, else digest;
              bits 6:0 kind), ValueSize u16, Value[ValueSize]
      then Nonce[32] (the responder's), OpaqueLength u16, OpaqueData (NVIDIA's TLVs:
              type u16, size u16, value; driver version, VBIOS version, FWID, ...),
              Signature[96]: ECDSA P-384, raw r||s (48 bytes each, big-endian), over
              SHA-384 of request || response without the signature.

NVIDIA's sample report is 4117 bytes = 37 + 8 + 3520 (64 blocks of 55 bytes) + 32 + 2 + 422 + 96.

Simplifications, deliberate and enforced (a report outside them is refused, never guessed at):
only SPDM 1.1, with a signature requested and all measurements asked for (Param2 0xFF), as NVIDIA
GPUs produce; only DMTF-format blocks; digest blocks must hold SHA-384 (48 bytes), the hash
NVIDIA GPUs negotiate, while raw bit-stream blocks may have any size; the signature is fixed at
96 bytes (P-384). The report must end exactly after the signature. Every structural problem
raises `GpuEvidenceError` naming the field and its offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from modelyo.errors import GpuEvidenceError

SPDM_VERSION_11 = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
SPDM_ERROR = 0x7F
PARAM1_SIGNATURE_REQUESTED = 0x01
ALL_MEASUREMENTS = 0xFF
MEASUREMENT_SPEC_DMTF = 0x01
VALUE_TYPE_RAW = 0x80

NONCE_SIZE = 32
REQUEST_SIZE = 37
RESPONSE_FIXED_SIZE = 8  # version, code, param1, param2, NumberOfBlocks, record length
SHA384_SIZE = 48
SIGNATURE_SIZE = 96
# SPDM 1.1 caps OpaqueLength at 1024 bytes.
MAX_OPAQUE_SIZE = 1024
# NVML's buffer (NVML_CC_GPU_ATTESTATION_REPORT_SIZE); real reports are about 4 KiB.
MAX_REPORT_SIZE = 8192

# DMTFSpecMeasurementValueType[6:0] in SPDM 1.1.
MEASUREMENT_KINDS = {
    0: "immutable ROM",
    1: "mutable firmware",
    2: "hardware configuration",
    3: "firmware configuration",
    4: "measurement manifest",
}

# NVIDIA's opaque-data field types (as numbered by NVIDIA's verifier).
OPAQUE_CERT_ISSUER_NAME = 1
OPAQUE_CERT_AUTHORITY_KEY_IDENTIFIER = 2
OPAQUE_DRIVER_VERSION = 3
OPAQUE_GPU_INFO = 4
OPAQUE_SKU = 5
OPAQUE_VBIOS_VERSION = 6
OPAQUE_MANUFACTURER_ID = 7
OPAQUE_TAMPER_DETECTION = 8
OPAQUE_SMC = 9
OPAQUE_VPR = 10
OPAQUE_NVDEC0_STATUS = 11
OPAQUE_MSRSCNT = 12
OPAQUE_CPRINFO = 13
OPAQUE_BOARD_ID = 14
OPAQUE_CHIP_SKU = 15
OPAQUE_CHIP_SKU_MOD = 16
OPAQUE_PROJECT = 17
OPAQUE_PROJECT_SKU = 18
OPAQUE_PROJECT_SKU_MOD = 19
OPAQUE_FWID = 20
OPAQUE_PROTECTED_PCIE_STATUS = 21


class _Reader:
    """A bounds-checked cursor: every short read names the field it was reading."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.offset = offset
        self.end = len(data) if end is None else end

    def take(self, size: int, name: str) -> bytes:
        if self.offset + size > self.end:
            raise GpuEvidenceError(
                f"needs {size} bytes but only {max(self.end - self.offset, 0)} remain",
                field=name,
                offset=self.offset,
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u8(self, name: str) -> int:
        return self.take(1, name)[0]

    def u16(self, name: str) -> int:
        return int.from_bytes(self.take(2, name), "little")

    def u24(self, name: str) -> int:
        return int.from_bytes(self.take(3, name), "little")


def _fixed(value: bytes, size: int, name: str) -> bytes:
    # Encoding a wrongly sized field would silently shift every later offset.
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def _expect(ok: bool, message: str, field: str, offset: int) -> None:
    if not ok:
        raise GpuEvidenceError(message, field=field, offset=offset)


@dataclass(frozen=True)
class MeasurementRequest:
    """The SPDM GET_MEASUREMENTS request (37 bytes) that carries the verifier's nonce."""

    nonce: bytes
    slot_id: int = 0
    version: int = SPDM_VERSION_11
    param1: int = PARAM1_SIGNATURE_REQUESTED
    param2: int = ALL_MEASUREMENTS

    def to_bytes(self) -> bytes:
        return (
            bytes([self.version, GET_MEASUREMENTS, self.param1, self.param2])
            + _fixed(self.nonce, NONCE_SIZE, "nonce")
            + bytes([self.slot_id])
        )

    @classmethod
    def parse(cls, r: _Reader) -> MeasurementRequest:
        start = r.offset
        version = r.u8("request.version")
        _expect(
            version == SPDM_VERSION_11,
            f"SPDM version {version:#04x} is not supported (only 0x11, SPDM 1.1)",
            "request.version",
            start,
        )
        code = r.u8("request.code")
        _expect(
            code == GET_MEASUREMENTS,
            f"request code {code:#04x} is not GET_MEASUREMENTS (0xe0)",
            "request.code",
            start + 1,
        )
        param1 = r.u8("request.param1")
        _expect(
            bool(param1 & PARAM1_SIGNATURE_REQUESTED),
            "the request did not ask for a signature, so the measurements are not signed",
            "request.param1",
            start + 2,
        )
        param2 = r.u8("request.param2")
        _expect(
            param2 == ALL_MEASUREMENTS,
            f"measurement operation {param2:#04x} is not 0xff (all measurements)",
            "request.param2",
            start + 3,
        )
        nonce = r.take(NONCE_SIZE, "request.nonce")
        slot = r.u8("request.slot_id")
        _expect(
            slot <= 0x0F,
            f"slot id byte {slot:#04x} has reserved bits set",
            "request.slot_id",
            start + 36,
        )
        return cls(nonce=nonce, slot_id=slot, version=version, param1=param1, param2=param2)


@dataclass(frozen=True)
class MeasurementBlock:
    """One DMTF measurement block of the measurement record."""

    index: int
    value: bytes
    value_type: int = 1  # digest of mutable firmware

    @property
    def raw(self) -> bool:
        """True when the value is a raw bit stream rather than a digest."""
        return bool(self.value_type & VALUE_TYPE_RAW)

    @property
    def kind(self) -> str:
        return MEASUREMENT_KINDS.get(self.value_type & 0x7F, f"type {self.value_type & 0x7F}")

    def to_bytes(self) -> bytes:
        if not 1 <= self.index <= 0xFE:
            raise ValueError(f"measurement index must be 1..254, got {self.index}")
        if not self.raw and len(self.value) != SHA384_SIZE:
            raise ValueError(f"a digest measurement is {SHA384_SIZE} bytes (SHA-384)")
        measurement = struct.pack("<BH", self.value_type, len(self.value)) + self.value
        return struct.pack("<BBH", self.index, MEASUREMENT_SPEC_DMTF, len(measurement)) + (
            measurement
        )

    @classmethod
    def parse(cls, r: _Reader, number: int) -> MeasurementBlock:
        name = f"response.measurement_record.block[{number}]"
        start = r.offset
        index = r.u8(f"{name}.index")
        _expect(
            1 <= index <= 0xFE,
            f"measurement index {index} is not in 1..254",
            f"{name}.index",
            start,
        )
        spec = r.u8(f"{name}.specification")
        _expect(
            spec == MEASUREMENT_SPEC_DMTF,
            f"measurement specification {spec:#04x} is not DMTF (0x01, the only one defined)",
            f"{name}.specification",
            start + 1,
        )
        size = r.u16(f"{name}.size")
        block = _Reader(r.data, r.offset, r.offset + size)
        r.take(size, f"{name}.measurement")  # bounds-check the whole block first
        value_type = block.u8(f"{name}.value_type")
        value_size = block.u16(f"{name}.value_size")
        value_at = block.offset
        value = block.take(value_size, f"{name}.value")
        _expect(
            block.offset == block.end,
            f"MeasurementSize {size} is not 3 + ValueSize {value_size}",
            f"{name}.size",
            start + 2,
        )
        _expect(
            bool(value_type & VALUE_TYPE_RAW) or value_size == SHA384_SIZE,
            f"a digest measurement must be {SHA384_SIZE} bytes (SHA-384), got {value_size}",
            f"{name}.value",
            value_at,
        )
        return cls(index=index, value=value, value_type=value_type)


@dataclass(frozen=True)
class OpaqueField:
    """One of NVIDIA's type-length-value fields in the response's opaque data."""

    type: int
    value: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("<HH", self.type, len(self.value)) + self.value


@dataclass(frozen=True)
class MeasurementsResponse:
    """The GPU's SPDM MEASUREMENTS response."""

    blocks: tuple[MeasurementBlock, ...]
    nonce: bytes
    opaque: tuple[OpaqueField, ...]
    signature: bytes = bytes(SIGNATURE_SIZE)
    version: int = SPDM_VERSION_11
    param1: int = 0
    param2: int = 0

    def unsigned_bytes(self) -> bytes:
        """The response up to (not including) the signature."""
        if not 1 <= len(self.blocks) <= 0xFF:
            raise ValueError("a response carries 1 to 255 measurement blocks")
        record = b"".join(block.to_bytes() for block in self.blocks)
        opaque = b"".join(item.to_bytes() for item in self.opaque)
        if len(opaque) > MAX_OPAQUE_SIZE:
            raise ValueError(f"opaque data is limited to {MAX_OPAQUE_SIZE} bytes")
        return (
            bytes([self.version, MEASUREMENTS, self.param1, self.param2, len(self.blocks)])
            + len(record).to_bytes(3, "little")
            + record
            + _fixed(self.nonce, NONCE_SIZE, "responder nonce")
            + struct.pack("<H", len(opaque))
            + opaque
        )

    def to_bytes(self) -> bytes:
        return self.unsigned_bytes() + _fixed(self.signature, SIGNATURE_SIZE, "signature")

    @classmethod
    def parse(cls, r: _Reader) -> MeasurementsResponse:
        start = r.offset
        version = r.u8("response.version")
        _expect(
            version == SPDM_VERSION_11,
            f"response SPDM version {version:#04x} is not 0x11 (SPDM 1.1)",
            "response.version",
            start,
        )
        code = r.u8("response.code")
        if code == SPDM_ERROR:
            raise GpuEvidenceError(
                "the GPU answered with an SPDM ERROR instead of MEASUREMENTS",
                field="response.code",
                offset=start + 1,
            )
        _expect(
            code == MEASUREMENTS,
            f"response code {code:#04x} is not MEASUREMENTS (0x60)",
            "response.code",
            start + 1,
        )
        param1 = r.u8("response.param1")
        param2 = r.u8("response.param2")
        count_at = r.offset
        count = r.u8("response.number_of_blocks")
        _expect(
            count > 0,
            "the response carries no measurement block",
            "response.number_of_blocks",
            count_at,
        )
        length_at = r.offset
        length = r.u24("response.measurement_record_length")
        record = _Reader(r.data, r.offset, r.offset + length)
        r.take(length, "response.measurement_record")
        blocks: list[MeasurementBlock] = []
        seen: set[int] = set()
        for number in range(count):
            block_at = record.offset
            block = MeasurementBlock.parse(record, number)
            _expect(
                block.index not in seen,
                f"measurement index {block.index} appears twice",
                f"response.measurement_record.block[{number}].index",
                block_at,
            )
            seen.add(block.index)
            blocks.append(block)
        _expect(
            record.offset == record.end,
            f"{record.end - record.offset} bytes of the record are left after {count} blocks",
            "response.measurement_record_length",
            length_at,
        )
        nonce = r.take(NONCE_SIZE, "response.nonce")
        opaque_length_at = r.offset
        opaque_length = r.u16("response.opaque_length")
        _expect(
            opaque_length <= MAX_OPAQUE_SIZE,
            f"OpaqueLength {opaque_length} exceeds SPDM's limit of {MAX_OPAQUE_SIZE}",
            "response.opaque_length",
            opaque_length_at,
        )
        opaque = _Reader(r.data, r.offset, r.offset + opaque_length)
        r.take(opaque_length, "response.opaque_data")
        fields: list[OpaqueField] = []
        while opaque.offset < opaque.end:
            number = len(fields)
            kind = opaque.u16(f"response.opaque_data[{number}].type")
            size = opaque.u16(f"response.opaque_data[{number}].size")
            fields.append(OpaqueField(kind, opaque.take(size, f"response.opaque_data[{number}]")))
        signature = r.take(SIGNATURE_SIZE, "response.signature")
        return cls(
            blocks=tuple(blocks),
            nonce=nonce,
            opaque=tuple(fields),
            signature=signature,
            version=version,
            param1=param1,
            param2=param2,
        )


def _text(value: bytes | None) -> str | None:
    # Version strings arrive NUL-terminated (C strings) from the GPU firmware.
    if value is None:
        return None
    return value.split(b"\0", 1)[0].decode("ascii", errors="replace")


@dataclass(frozen=True)
class AttestationReport:
    """A parsed GPU attestation report; `raw` keeps the exact bytes that were signed."""

    request: MeasurementRequest
    response: MeasurementsResponse
    raw: bytes

    @property
    def nonce(self) -> bytes:
        """The verifier's nonce, as the GPU signed it (in the request)."""
        return self.request.nonce

    @property
    def signed_bytes(self) -> bytes:
        """request || response without the signature: what the signature covers."""
        return self.raw[:-SIGNATURE_SIZE]

    @property
    def signature(self) -> bytes:
        return self.response.signature

    @property
    def measurements(self) -> dict[int, bytes]:
        """Measurement index -> value (a SHA-384 digest for digest blocks)."""
        return {block.index: block.value for block in self.response.blocks}

    def opaque(self, kind: int) -> bytes | None:
        """The first opaque field of `kind`, or None."""
        return next((item.value for item in self.response.opaque if item.type == kind), None)

    @property
    def driver_version(self) -> str | None:
        return _text(self.opaque(OPAQUE_DRIVER_VERSION))

    @property
    def vbios_version(self) -> str | None:
        return _text(self.opaque(OPAQUE_VBIOS_VERSION))

    @property
    def fwid(self) -> bytes | None:
        """The firmware id the GPU reports; must equal the FWID in its leaf certificate."""
        return self.opaque(OPAQUE_FWID)


def encode_unsigned(request: MeasurementRequest, response: MeasurementsResponse) -> bytes:
    """The bytes a report's signature covers: request || response without the signature."""
    return request.to_bytes() + response.unsigned_bytes()


def encode_report(request: MeasurementRequest, response: MeasurementsResponse) -> bytes:
    """A whole attestation report, as NVML returns it."""
    return request.to_bytes() + response.to_bytes()


def parse_report(data: bytes) -> AttestationReport:
    """Parse an attestation report, refusing anything outside the layout above."""
    if not isinstance(data, bytes | bytearray):
        raise GpuEvidenceError(
            f"expected bytes, got {type(data).__name__}", field="report", offset=0
        )
    data = bytes(data)
    if len(data) > MAX_REPORT_SIZE:
        raise GpuEvidenceError(
            f"{len(data)} bytes is larger than NVML's {MAX_REPORT_SIZE}-byte report buffer",
            field="report",
            offset=MAX_REPORT_SIZE,
        )
    r = _Reader(data)
    request = MeasurementRequest.parse(r)
    response = MeasurementsResponse.parse(r)
    if r.offset != len(data):
        raise GpuEvidenceError(
            f"{len(data) - r.offset} unexpected bytes after the signature",
            field="report.trailing",
            offset=r.offset,
        )
    return AttestationReport(request=request, response=response, raw=data)
