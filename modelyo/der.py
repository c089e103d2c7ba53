"""A tiny DER writer: just enough to build the certificate extensions the simulators issue
(Intel's SGX PCK extension, a DICE TCB-info with a firmware id). Parsing is left to
`cryptography` and the verifiers; nothing here reads untrusted input."""

from __future__ import annotations

BOOLEAN, INTEGER, OCTET_STRING, OBJECT_IDENTIFIER, ENUMERATED, SEQUENCE = (
    0x01, 0x02, 0x04, 0x06, 0x0A, 0x30,
)  # fmt: skip


def tlv(tag: int, content: bytes) -> bytes:
    """One tag-length-value, with the definite length in short or long form."""
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form."""
    arcs = [int(part) for part in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(OBJECT_IDENTIFIER, bytes(body))


def unsigned(value: int) -> bytes:
    """The content octets of a non-negative INTEGER (minimal two's complement: 255 is 00 FF)."""
    return value.to_bytes(value.bit_length() // 8 + 1, "big")


def sequence(*items: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(items))
