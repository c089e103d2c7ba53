"""What each CA endpoint does and who may call it, without HTTP.

The HTTP layer (`ca_enclave.app`) passes the client certificate that the TLS handshake verified
(or None) and the parsed request; the service checks the caller's role against the CA root,
does the work, records it in the audit log, and returns the wire model from
`modelyo.api.ca`. Refusals are `ServiceError`s (`modelyo.service.errors`, shared with the
agent) carrying the HTTP status and the API's error code, with a message that says what to do.

Who may call what is the table in `modelyo.api.ca`. A client certificate counts only if the
CA root signed it directly: certificates that a VM's intermediate (role vm-issuer) signed
chain to the root in the TLS handshake but are refused here whatever role they claim.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_enclave.keyring import KeyVersionError
from ca_enclave.store import (
    AlreadyOwnedError,
    OwnerRecord,
    Store,
    VmRecord,
    already_owned_message,
    spki_sha256,
)
from modelyo import audit, pki
from modelyo.api.ca import (
    ANY_KEY_ID,
    KEY_ID_PATTERN,
    AttestationResponse,
    AuditLog,
    CaPolicy,
    KeyRequest,
    OwnershipClaim,
    OwnershipGrant,
    ReleasedKey,
    RotationResult,
    VmCertificate,
    VmInfo,
    VmList,
    VmRegistration,
    VmRegistrationResult,
    VmRule,
)
from modelyo.attestation import binding, ratls
from modelyo.attestation.collateral import Collateral
from modelyo.attestation.verify import TrustRoot, Verdict, verify_quote
from modelyo.errors import CollateralError, PlatformError
from modelyo.pki import CertificateError, Role
from modelyo.service.errors import AlreadyOwned as Conflict
from modelyo.service.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    Refused,
    Unauthenticated,
    Unavailable,
)
from modelyo.tee.provider import QuoteProvider
from modelyo.tee.sim import SimulatedPlatform

# MRSIGNER of the CA on the simulated platform: a fixed, documented value (there is no signing
# key to hash); `modelyo measure ca` gives the MRENCLAVE.
SIMULATED_MRSIGNER = hashlib.sha256(b"modelyo simulated signer").digest()
CA_COMMON_NAME = "Modelyo CA"
OWNER_DEFAULT_NAME = "Modelyo owner"
MAX_HOSTS = 16
_NONCE = re.compile(r"[0-9a-fA-F]{64}")
_KEY_ID = re.compile(KEY_ID_PATTERN)
_HOST = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)


# --- the platform the CA runs on ------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """Where the CA's quotes and collateral come from, and how VM quotes are verified."""

    name: str  # "simulated" or "gramine"
    provider: QuoteProvider
    simulated: bool
    collateral: Callable[[], Collateral]  # for the CA's own SGX quotes
    # The simulated platform whose root a policy with root "simulation" names (None on
    # hardware unless --sim-dir was given).
    sim_platform: SimulatedPlatform | None = None
    # Collateral for VM quotes that arrive without any (hardware: an operator-refreshed file).
    vm_collateral: Callable[[], Collateral] | None = None


@dataclass(frozen=True)
class TlsIdentity:
    """The CA's TLS key and its root-issued certificate carrying a quote that binds the key."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def spki(self) -> bytes:
        return binding.spki_der(self.key.public_key())


def issue_tls_identity(store: Store, provider: QuoteProvider, hosts: Sequence[str]) -> TlsIdentity:
    """A fresh TLS key and a CA-server certificate from the root with the key's quote in it."""
    key = pki.new_key()
    quote = provider.get_quote(binding.report_data(binding.spki_der(key.public_key())))
    cert = pki.issue(
        key.public_key(),
        issuer_key=store.root_key,
        issuer_cert=store.root_certificate,
        role=Role.CA_SERVER,
        common_name=CA_COMMON_NAME,
        hosts=hosts,
        extensions=[x509.UnrecognizedExtension(ratls.QUOTE_OID, quote)],
    )
    return TlsIdentity(key, cert)


@dataclass(frozen=True)
class Caller:
    """A client whose certificate the root issued, with the role it proved."""

    role: Role
    certificate: x509.Certificate
    vm: VmRecord | None = None

    @property
    def fingerprint(self) -> str:
        return pki.fingerprint(self.certificate)


# --- the service -------------------------------------------------------------------------------


class CaService:
    """The Modelyo CA: attestation, ownership, VM registration, policy, keys, audit."""

    def __init__(
        self,
        store: Store,
        platform: Platform,
        tls: TlsIdentity,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.platform = platform
        self.tls = tls
        self._clock = clock
        self._root_pem = pki.cert_pem(store.root_certificate)

    # --- open to anyone ------------------------------------------------------------------

    def attestation(self, nonce_hex: str) -> AttestationResponse:
        """A fresh quote binding the TLS key and the caller's 32-byte nonce."""
        if not isinstance(nonce_hex, str) or not _NONCE.fullmatch(nonce_hex):
            raise BadRequest(
                "nonce must be 32 random bytes as 64 hex digits (?nonce=HEX); make a fresh one "
                "for each attestation"
            )
        nonce = bytes.fromhex(nonce_hex)
        try:
            quote = self.platform.provider.get_quote(binding.report_data(self.tls.spki, nonce))
            collateral = self.platform.collateral()
        except (PlatformError, CollateralError) as exc:
            raise Unavailable(f"the CA cannot attest itself right now: {exc}") from exc
        return AttestationResponse(
            quote=base64.b64encode(quote).decode("ascii"),
            collateral=collateral.json_text,
            certificate_chain=[pki.cert_pem(self.tls.certificate), self._root_pem],
            simulated=self.platform.simulated,
        )

    def claim_ownership(self, claim: OwnershipClaim) -> OwnershipGrant:
        """Grant ownership to the first claim; later claims get `Conflict` ("already owned")."""
        csr = _load_csr(claim.csr)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # load_csr checked
        digest = spki_sha256(public_key)
        owner = self.store.owner
        if owner is not None and not hmac.compare_digest(owner.spki_sha256, digest):
            # Cheap refusal before signing anything; the store decides again atomically.
            raise Conflict(already_owned_message(owner))
        name = _csr_common_name(csr) or OWNER_DEFAULT_NAME
        cert = pki.issue(
            public_key,
            issuer_key=self.store.root_key,
            issuer_cert=self.store.root_certificate,
            role=Role.OWNER,
            common_name=name,
        )
        record = OwnerRecord(
            spki_sha256=digest,
            certificate=pki.cert_pem(cert),
            common_name=name,
            claimed_at=int(self._clock()),
            ca_fingerprint=self.store.root_fingerprint,
        )
        try:
            winner, _new = self.store.claim_ownership(record)
        except AlreadyOwnedError as exc:
            raise Conflict(str(exc)) from None
        return OwnershipGrant(client_certificate=winner.certificate, ca_certificate=self._root_pem)

    def register_vm(self, request: VmRegistration) -> VmRegistrationResult:
        """Check a VM's quote against the policy and issue its certificates."""
        csr = _load_csr(request.csr)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        hosts = _check_hosts(request.hosts)
        quote = _b64("quote", request.quote)
        collateral = self._vm_collateral(request.collateral)
        # One step from reading the policy to recording the VM, so that a policy replaced
        # meanwhile cannot leave the VM with the old policy's key ids.
        with self.store.lock:
            record = self._admit_vm(request, public_key, hosts, quote, collateral)
        return VmRegistrationResult(
            vm_id=record.vm_id,
            server_certificate=record.server_certificate,
            client_certificate=record.client_certificate,
            issuer_certificate=record.issuer_certificate,
            ca_certificate=self._root_pem,
            key_ids=record.key_ids,
        )

    def _admit_vm(
        self,
        request: VmRegistration,
        public_key: ec.EllipticCurvePublicKey,
        hosts: list[str],
        quote: bytes,
        collateral: Collateral,
    ) -> VmRecord:
        """Verify the quote under the current policy, then issue and record (store lock held)."""
        policy = self.store.policy
        if not policy.vms:
            raise Refused(
                "the CA's policy admits no VM yet (policy.vms is empty); the owner adds a rule "
                "with the VM's measurements (`modelyo measure agent`) through PUT /v1/policy"
            )
        root = self._vm_root(policy)
        spki = binding.spki_der(public_key)
        expected = binding.report_data(spki)
        now = int(self._clock())
        base = verify_quote(quote, collateral, root=root, now=now, expected_report_data=expected)
        if not base.accepted:
            # Not a genuine quote under the policy's root, or not bound to this key: nothing is
            # recorded, so unauthenticated callers cannot grow the audit log.
            raise Refused(f"VM quote refused: {base.reason()}")
        index, verdict, reasons = _first_accepting_rule(
            quote, collateral, root, policy, expected, now
        )
        vm_id = _vm_id(spki)
        if index is None or verdict is None:
            detail = "; ".join(reasons)
            self.store.record(
                audit.VM_REFUSED,
                {
                    "name": request.name,
                    "vm_id": vm_id,
                    "measurements": base.measurements,
                    "reason": detail[:2000],
                },
            )
            raise Refused(f"VM quote refused by the CA's policy: {detail}")
        rule = policy.vms[index]
        record = self._issue_vm(request, public_key, hosts, rule, verdict, collateral)
        self.store.put_vm(
            record,
            {
                "vm_id": vm_id,
                "name": request.name,
                "rule": rule.name,
                "measurements": record.measurements,
                "tcb_status": record.tcb_status,
                "simulated": record.simulated,
                "key_ids": record.key_ids,
                "server_certificate_sha256": pki.fingerprint(
                    pki.load_cert(record.server_certificate)
                ),
            },
        )
        return record

    # --- owner ---------------------------------------------------------------------------------

    def list_vms(self, peer: x509.Certificate | None) -> VmList:
        self._authenticate(peer, Role.OWNER)
        vms = sorted(self.store.vms.values(), key=lambda vm: (vm.registered_at, vm.vm_id))
        return VmList(vms=[_vm_info(vm) for vm in vms])

    def vm_certificate(self, peer: x509.Certificate | None, vm_id: str) -> VmCertificate:
        self._authenticate(peer, Role.OWNER)
        vm = self.store.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"no VM {vm_id!r} is registered; list them with GET /v1/vms")
        return VmCertificate(
            vm_id=vm.vm_id, server_certificate=vm.server_certificate, ca_certificate=self._root_pem
        )

    def get_policy(self, peer: x509.Certificate | None) -> CaPolicy:
        self._authenticate(peer, Role.OWNER)
        return self.store.policy

    def put_policy(self, peer: x509.Certificate | None, policy: CaPolicy) -> CaPolicy:
        """Replace the policy; every registered VM's key access is recomputed under it."""
        caller = self._authenticate(peer, Role.OWNER)
        _check_policy(policy)
        try:
            root = self._vm_root(policy) if policy.vms else None
        except Refused as exc:
            raise BadRequest(str(exc)) from None
        with self.store.lock:  # no registration may slip in between reading and replacing
            return self._replace_policy(caller, policy, root)

    def _replace_policy(self, caller: Caller, policy: CaPolicy, root: TrustRoot | None) -> CaPolicy:
        """Re-check every VM's recorded evidence under `policy`, then store it (lock held)."""
        updated: dict[str, VmRecord] = {}
        access: dict[str, list[str]] = {}
        for vm_id, vm in self.store.vms.items():
            rule_name, key_ids = None, []
            if root is not None:
                index, _verdict, _reasons = _first_accepting_rule(
                    base64.b64decode(vm.quote),
                    Collateral(vm.collateral),
                    root,
                    policy,
                    binding.report_data(bytes.fromhex(vm.spki)),
                    vm.registered_at,
                )
                if index is not None:
                    rule_name, key_ids = policy.vms[index].name, list(policy.vms[index].key_ids)
            updated[vm_id] = vm.model_copy(update={"rule": rule_name, "key_ids": key_ids})
            access[vm_id] = key_ids
        self.store.set_policy(
            policy,
            updated,
            {
                "by": caller.fingerprint,
                "root": policy.root,
                "rules": [rule.name for rule in policy.vms],
                "vm_key_ids": access,
            },
        )
        return self.store.policy

    def rotate(self, peer: x509.Certificate | None) -> RotationResult:
        self._authenticate(peer, Role.OWNER)
        return RotationResult(version=self.store.rotate())

    def audit_log(self, peer: x509.Certificate | None) -> AuditLog:
        self._authenticate(peer, Role.OWNER)
        return AuditLog(entries=self.store.audit_entries(), ca_certificate=self._root_pem)

    # --- owner or registered VM ----------------------------------------------------------------

    def release_key(self, peer: x509.Certificate | None, request: KeyRequest) -> ReleasedKey:
        """The KEK for a key id and version, to the owner or to a VM the policy allows."""
        caller = self._authenticate(peer, Role.OWNER, Role.VM)
        if caller.vm is not None:
            allowed = caller.vm.key_ids
            if request.key_id not in allowed and ANY_KEY_ID not in allowed:
                rule = f"rule {caller.vm.rule!r}" if caller.vm.rule else "no policy rule"
                raise Forbidden(
                    f"VM {caller.vm.name!r} ({caller.vm.vm_id}) may not receive key id "
                    f"{request.key_id!r}: {rule} allows {allowed or 'no key ids'}; the owner "
                    "can change this with PUT /v1/policy"
                )
        try:
            version, key = self.store.keyring().kek(request.key_id, request.version)
        except KeyVersionError as exc:
            raise NotFound(str(exc)) from None
        details: dict[str, object] = {
            "key_id": request.key_id,
            "version": version,
            "to": "vm" if caller.vm is not None else "owner",
            "certificate_sha256": caller.fingerprint,
        }
        if caller.vm is not None:
            details["vm_id"] = caller.vm.vm_id
        self.store.record(audit.KEY_RELEASED, details)
        return ReleasedKey(
            key_id=request.key_id, version=version, key=base64.b64encode(key).decode("ascii")
        )

    # --- helpers -----------------------------------------------------------------------------

    def _authenticate(self, peer: x509.Certificate | None, *roles: Role) -> Caller:
        wanted = " or ".join(str(role) for role in roles)
        if peer is None:
            raise Unauthenticated(
                f"no client certificate was presented; this call needs a certificate of role "
                f"{wanted} from this CA (the owner's is ca_client.pem with ca_client.key, "
                "written by `modelyo attest`)"
            )
        try:
            # Directly under the root, nothing in between: see the module docstring.
            pki.verify_chain(peer, [], self.store.root_certificate)
        except CertificateError as exc:
            raise Forbidden(f"client certificate refused: {exc}") from None
        role = pki.role_of(peer)
        if role not in roles:
            raise Forbidden(
                f"client certificate {pki.common_name(peer)!r} has role {role or 'none'}; this "
                f"call needs role {wanted}"
            )
        public_key = peer.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # the root only issues P-256
        if role is Role.OWNER:
            owner = self.store.owner
            if owner is None or not hmac.compare_digest(owner.spki_sha256, spki_sha256(public_key)):
                raise Forbidden("this owner certificate is not the CA's current owner's")
            return Caller(role, peer)
        spki = binding.spki_der(public_key)
        vm = self.store.vms.get(_vm_id(spki))
        if vm is None or not hmac.compare_digest(vm.spki, spki.hex()):
            raise Forbidden(
                f"VM certificate {pki.common_name(peer)!r} belongs to no registered VM; the VM "
                "must register again (POST /v1/vms)"
            )
        return Caller(role, peer, vm)

    def _vm_root(self, policy: CaPolicy) -> TrustRoot:
        if policy.root == "intel":
            return TrustRoot.intel()
        sim = self.platform.sim_platform
        if sim is None:
            raise Refused(
                "the policy trusts the simulation root, but this CA runs on hardware without a "
                "simulated platform; set policy.root to intel"
            )
        return TrustRoot("simulation", sim.root_certificate_der(), simulated=True)

    def _vm_collateral(self, text: str | None) -> Collateral:
        # Collateral is signed by the platform's PKI and checked under the policy's root, so a
        # VM may bring it; the CA's own is the fallback.
        if text is not None:
            try:
                return Collateral.from_json(text)
            except CollateralError as exc:
                raise BadRequest(str(exc)) from None
        if self.platform.sim_platform is not None and self.platform.simulated:
            return self.platform.sim_platform.collateral("tdx")
        if self.platform.vm_collateral is not None:
            try:
                return self.platform.vm_collateral()
            except CollateralError as exc:
                raise Unavailable(f"the CA's VM collateral is unusable: {exc}") from exc
        raise BadRequest(
            "no collateral: send the TD quote's collateral (dcap-qvl QuoteCollateralV3 JSON) "
            "with the registration, or start the CA with --vm-collateral FILE"
        )

    def _issue_vm(
        self,
        request: VmRegistration,
        public_key: ec.EllipticCurvePublicKey,
        hosts: list[str],
        rule: VmRule,
        verdict: Verdict,
        collateral: Collateral,
    ) -> VmRecord:
        """The VM's three certificates on its key, and its record."""
        name = _printable(request.name) or "vm"
        spki = binding.spki_der(public_key)
        vm_id = _vm_id(spki)
        issuer = {"issuer_key": self.store.root_key, "issuer_cert": self.store.root_certificate}
        common_name = f"{name} ({vm_id})"[:64]
        server = pki.issue(
            public_key, **issuer, role=Role.VM_SERVER, common_name=common_name, hosts=hosts
        )
        client = pki.issue(public_key, **issuer, role=Role.VM, common_name=common_name)
        intermediate = pki.issue(public_key, **issuer, role=Role.VM_ISSUER, common_name=common_name)
        return VmRecord(
            vm_id=vm_id,
            name=name,
            registered_at=int(self._clock()),
            rule=rule.name,
            measurements=verdict.measurements,
            tcb_status=verdict.status,
            simulated=verdict.simulated,
            key_ids=list(rule.key_ids),
            spki=spki.hex(),
            server_certificate=pki.cert_pem(server),
            client_certificate=pki.cert_pem(client),
            issuer_certificate=pki.cert_pem(intermediate),
            quote=request.quote,
            collateral=collateral.json_text,
        )


# --- pure helpers ------------------------------------------------------------------------------


def _first_accepting_rule(
    quote: bytes,
    collateral: Collateral,
    root: TrustRoot,
    policy: CaPolicy,
    expected_report_data: bytes,
    now: int,
) -> tuple[int | None, Verdict | None, list[str]]:
    """The index and verdict of the first rule accepting the quote, or the reasons of each."""
    reasons: list[str] = []
    for index, rule in enumerate(policy.vms):
        verdict = verify_quote(
            quote,
            collateral,
            root=root,
            now=now,
            policy=rule.tdx,
            policy_name=f"vms[{index}].tdx",
            expected_report_data=expected_report_data,
        )
        if verdict.accepted:
            return index, verdict, reasons
        reasons.append(f"rule vms[{index}] ({rule.name}): {verdict.reason()}")
    return None, None, reasons


def _vm_id(spki: bytes) -> str:
    """A VM's id: the first 16 hex digits of the SHA-256 of its key's SubjectPublicKeyInfo."""
    return hashlib.sha256(spki).hexdigest()[:16]


def _vm_info(vm: VmRecord) -> VmInfo:
    return VmInfo(
        vm_id=vm.vm_id,
        name=vm.name,
        registered_at=vm.registered_at,
        measurements=vm.measurements,
        tcb_status=vm.tcb_status,
        simulated=vm.simulated,
        key_ids=vm.key_ids,
        server_certificate=vm.server_certificate,
    )


def _load_csr(pem: str) -> x509.CertificateSigningRequest:
    try:
        return pki.load_csr(pem)
    except CertificateError as exc:
        raise BadRequest(str(exc)) from None


def _printable(text: str, limit: int = 64) -> str:
    """`text` without control characters, at most `limit` long: it goes into names and logs."""
    return "".join(ch for ch in text if ch.isprintable())[:limit].strip()


def _csr_common_name(csr: x509.CertificateSigningRequest) -> str:
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return _printable(str(names[0].value)) if names else ""


def _b64(field: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field} must be base64") from None


def _check_hosts(hosts: Sequence[str]) -> list[str]:
    if len(hosts) > MAX_HOSTS:
        raise BadRequest(f"at most {MAX_HOSTS} hosts, got {len(hosts)}")
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST.match(host):
                raise BadRequest(f"host {host!r} is neither an IP address nor a DNS name") from None
    return list(hosts)


def _check_policy(policy: CaPolicy) -> None:
    names = [rule.name for rule in policy.vms]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise BadRequest(f"rule names must be unique; repeated: {', '.join(duplicates)}")
    for index, rule in enumerate(policy.vms):
        for key_id in rule.key_ids:
            if key_id != ANY_KEY_ID and not _KEY_ID.match(key_id):
                raise BadRequest(
                    f"vms[{index}].key_ids: {key_id!r} is not a key id ({KEY_ID_PATTERN}) "
                    f"nor {ANY_KEY_ID!r}"
                )
