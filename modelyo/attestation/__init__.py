"""Attestation: DCAP quotes parsed, verified with collateral, and judged by policy.

    from modelyo.attestation import parse_quote, verify_quote, TrustRoot, Collateral

`quote` is the byte layout, `collateral` what verification needs besides the quote,
`verify` the dcap-qvl path plus our checks, `policy` what a verifier accepts, `binding` the
REPORTDATA formula and `ratls` certificates that carry quotes.
"""

from modelyo.attestation.binding import report_data, spki_der
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.policy import Policy, SgxPolicy, TcbPolicy, TdxPolicy, load_policy
from modelyo.attestation.quote import Quote, parse_quote, quote_from_file_bytes
from modelyo.attestation.verify import Check, TrustRoot, Verdict, verify_quote

__all__ = [
    "Check",
    "Collateral",
    "Policy",
    "Quote",
    "SgxPolicy",
    "TcbPolicy",
    "TdxPolicy",
    "TrustRoot",
    "Verdict",
    "load_policy",
    "parse_quote",
    "quote_from_file_bytes",
    "report_data",
    "spki_der",
    "verify_quote",
]
