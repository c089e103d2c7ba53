"""Collateral the simulated "Intel" issues: TCB info, QE identity, CRLs and issuer chains.

The JSON shapes are Intel's PCS v4 ones (TCB info v3: id "SGX", or id "TDX" with `tdxModule`
and `tdxModuleIdentities`; enclave identity v2: id "QE" or "TD_QE"), signed raw r||s by the
TCB signing key over the exact JSON text, and packaged as dcap-qvl's QuoteCollateralV3.

`tcb_status` chooses which TCB level the platform lands on, so policy tests get every status
honestly out of dcap-qvl's own level matching: for a status other than UpToDate the levels list
a newer (unreachable) UpToDate level first, then the platform's level with that status.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modelyo.attestation.collateral import Collateral
from modelyo.errors import PlatformError
from modelyo.tee.provider import Tee
from modelyo.tee.sim.pki import SimulatedPki, sign_raw

SIMULATED = True

VALIDITY = dt.timedelta(days=30)  # Intel's TCB info, QE identity and PCK CRL all live 30 days
TCB_EVALUATION_DATA_NUMBER = 17
TCB_DATE = "2024-03-13T00:00:00Z"
OLD_TCB_DATE = "2023-02-15T00:00:00Z"

TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
# A real advisory that SWHardeningNeeded platforms commonly carry (Intel SA-00615, MMIO stale
# data); a policy that rejects advisories by id can be tested against it.
DEFAULT_ADVISORY_IDS = ("INTEL-SA-00615",)
OUT_OF_DATE_ADVISORY_IDS = ("INTEL-SA-00828", "INTEL-SA-00615")

# Intel's QE MISCSELECT/ATTRIBUTES policy, as in its published QE and TD_QE identities.
QE_MISCSELECT = 0
QE_MISCSELECT_MASK = 0xFFFFFFFF
QE_ATTRIBUTES = bytes.fromhex("11000000000000000000000000000000")
QE_ATTRIBUTES_MASK = bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000")


@dataclass(frozen=True)
class PlatformTcb:
    """What the TCB info describes: the platform's FMSPC and SVNs (and its TDX module)."""

    fmspc: bytes
    pce_id: bytes
    cpu_svn: bytes
    pce_svn: int
    tee_tcb_svn: bytes
    mr_signer_seam: bytes = bytes(48)
    seam_attributes: bytes = bytes(8)


@dataclass(frozen=True)
class QeIdentity:
    """A quoting enclave's identity: what the QE identity collateral pins."""

    mr_signer: bytes
    mr_enclave: bytes
    isv_prod_id: int
    isv_svn: int


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(obj: dict[str, Any]) -> str:
    # Compact, like Intel's PCS; the signature covers exactly these bytes.
    return json.dumps(obj, separators=(",", ":"))


def _components(svns: bytes) -> list[dict[str, int]]:
    return [{"svn": svn} for svn in svns]


def _level(
    tcb: PlatformTcb,
    tee: Tee,
    *,
    cpu_svn: bytes,
    pce_svn: int,
    status: str,
    advisories: Sequence[str],
    date: str,
) -> dict[str, Any]:
    level_tcb: dict[str, Any] = {"sgxtcbcomponents": _components(cpu_svn), "pcesvn": pce_svn}
    if tee is Tee.TDX:
        level_tcb["tdxtcbcomponents"] = _components(tcb.tee_tcb_svn)
    level: dict[str, Any] = {"tcb": level_tcb, "tcbDate": date, "tcbStatus": status}
    if advisories:
        level["advisoryIDs"] = list(advisories)
    return level


def check_tcb_status(tcb_status: str) -> str:
    """Return `tcb_status` if it is one of Intel's TCB statuses, else raise `PlatformError`."""
    if tcb_status not in TCB_STATUSES:
        raise PlatformError(
            f"unknown TCB status {tcb_status!r}; the simulated platform can issue collateral "
            f"for one of: {', '.join(TCB_STATUSES)}"
        )
    return tcb_status


def tcb_info_json(
    tcb: PlatformTcb,
    tee: Tee,
    *,
    issue: dt.datetime,
    tcb_status: str = "UpToDate",
    advisory_ids: Sequence[str] | None = None,
) -> str:
    """The TCB info object (v3) whose matching level for this platform has `tcb_status`."""
    check_tcb_status(tcb_status)
    if advisory_ids is None:
        advisory_ids = () if tcb_status == "UpToDate" else DEFAULT_ADVISORY_IDS
    if tcb.pce_svn < 1 or tcb.cpu_svn[0] >= 255:
        raise PlatformError("the simulated platform's SVNs leave no room for TCB levels")
    # (CPUSVN, PCESVN, status, advisories, date) of each level, newest first as Intel lists them.
    rows: list[tuple[bytes, int, str, Sequence[str], str]] = []
    if tcb_status != "UpToDate":
        # A newer microcode the platform does not have: it must not match this level.
        newer = bytes([tcb.cpu_svn[0] + 1]) + tcb.cpu_svn[1:]
        rows.append((newer, tcb.pce_svn, "UpToDate", (), TCB_DATE))
    rows.append((tcb.cpu_svn, tcb.pce_svn, tcb_status, advisory_ids, TCB_DATE))
    # An older PCE level below the platform, so level matching has something to skip past.
    rows.append((tcb.cpu_svn, tcb.pce_svn - 1, "OutOfDate", OUT_OF_DATE_ADVISORY_IDS, OLD_TCB_DATE))
    levels = [
        _level(tcb, tee, cpu_svn=cpu, pce_svn=pce, status=status, advisories=ids, date=date)
        for cpu, pce, status, ids, date in rows
    ]
    info: dict[str, Any] = {
        "id": "TDX" if tee is Tee.TDX else "SGX",
        "version": 3,
        "issueDate": _iso(issue),
        "nextUpdate": _iso(issue + VALIDITY),
        "fmspc": tcb.fmspc.hex().upper(),
        "pceId": tcb.pce_id.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
    }
    if tee is Tee.TDX:
        module = {
            "mrsigner": tcb.mr_signer_seam.hex().upper(),
            "attributes": tcb.seam_attributes.hex().upper(),
            "attributesMask": "FF" * 8,
        }
        # TEE_TCB_SVN byte 1 selects the module identity TDX_%02X, byte 0 is its ISVSVN.
        module_id = f"TDX_{tcb.tee_tcb_svn[1]:02X}"
        info["tdxModule"] = module
        info["tdxModuleIdentities"] = [
            {
                "id": module_id,
                **module,
                "tcbLevels": [
                    {
                        "tcb": {"isvsvn": tcb.tee_tcb_svn[0]},
                        "tcbDate": TCB_DATE,
                        "tcbStatus": "UpToDate",
                    }
                ],
            }
        ]
    info["tcbLevels"] = levels
    return _json(info)


def qe_identity_json(qe: QeIdentity, tee: Tee, *, issue: dt.datetime) -> str:
    """The enclave identity object (v2) of the QE ("QE") or the TD quoting enclave ("TD_QE")."""
    levels: list[dict[str, Any]] = [
        {"tcb": {"isvsvn": qe.isv_svn}, "tcbDate": TCB_DATE, "tcbStatus": "UpToDate"}
    ]
    if qe.isv_svn > 0:
        levels.append(
            {
                "tcb": {"isvsvn": qe.isv_svn - 1},
                "tcbDate": OLD_TCB_DATE,
                "tcbStatus": "OutOfDate",
                "advisoryIDs": list(DEFAULT_ADVISORY_IDS),
            }
        )
    return _json(
        {
            "id": "TD_QE" if tee is Tee.TDX else "QE",
            "version": 2,
            "issueDate": _iso(issue),
            "nextUpdate": _iso(issue + VALIDITY),
            "tcbEvaluationDataNumber": TCB_EVALUATION_DATA_NUMBER,
            "miscselect": f"{QE_MISCSELECT:08X}",
            "miscselectMask": f"{QE_MISCSELECT_MASK:08X}",
            "attributes": QE_ATTRIBUTES.hex().upper(),
            "attributesMask": QE_ATTRIBUTES_MASK.hex().upper(),
            "mrsigner": qe.mr_signer.hex().upper(),
            "isvprodid": qe.isv_prod_id,
            "tcbLevels": levels,
        }
    )


def issue_collateral(
    pki: SimulatedPki,
    tcb: PlatformTcb,
    qe: QeIdentity,
    tee: Tee,
    *,
    now: int,
    tcb_status: str = "UpToDate",
    advisory_ids: Sequence[str] | None = None,
) -> Collateral:
    """Collateral valid from `now` for 30 days: TCB info, QE identity, both CRLs, chains."""
    issue = dt.datetime.fromtimestamp(now, dt.UTC)
    tcb_info = tcb_info_json(
        tcb, tee, issue=issue, tcb_status=tcb_status, advisory_ids=advisory_ids
    )
    qe_identity = qe_identity_json(qe, tee, issue=issue)
    chain = pki.tcb_issuer_chain()
    return Collateral.from_parts(
        {
            "pck_crl_issuer_chain": pki.pck_crl_issuer_chain(),
            "root_ca_crl": pki.root_crl(issue, issue + VALIDITY),
            "pck_crl": pki.pck_crl(issue, issue + VALIDITY),
            "tcb_info_issuer_chain": chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": sign_raw(pki.tcb_signing_key, tcb_info.encode("utf-8")),
            "qe_identity_issuer_chain": chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": sign_raw(pki.tcb_signing_key, qe_identity.encode("utf-8")),
        }
    )
