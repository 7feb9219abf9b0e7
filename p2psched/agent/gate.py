"""The agent's door: who may submit, read and cancel, and who vouches for a result.

It puts the security library (``p2psched/security``) in front of the agent:
admission of signed submissions, authentication of reads and cancels, the node's
identity key and measurement, and the attestation report signed after each job.
Without ``--tenants`` the agent is open single-tenant: every request is admitted as
tenant ``default`` and the agent says so at start-up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from p2psched.agent.datadir import data_dir_error
from p2psched.agent.errors import AgentError, StartupError
from p2psched.config import AgentSettings
from p2psched.jobs.spec import JobSpec
from p2psched.sandbox.base import SandboxResult
from p2psched.security.admission import Admission, Admitted, TenantUsage
from p2psched.security.attestation import NodeKey, NodeKeyError, measure, open_node_key, report_from_result
from p2psched.security.errors import AdmissionError
from p2psched.security.nonces import SQLiteNonceStore
from p2psched.security.request_auth import OPEN_PRINCIPAL, Principal
from p2psched.security.tenants import RegistryError, RegistryHolder, Reload

log = logging.getLogger("p2psched.security")

#: Settings that differ between agents of one cluster by design; the measurement
#: leaves them out so that identically configured agents share one measurement.
NODE_LOCAL = {"node_id", "api", "gossip", "transfer", "advertise", "data_dir", "cpus", "mem_mb", "join",
              "join_dns", "gpus", "gpu_profile", "membership", "process_warm_pool", "log_format", "log_level",
              "tls_dir", "gossip_key", "tenants", "topology", "labels"}


def to_agent_error(e: AdmissionError) -> AgentError:
    return AgentError(e.message, reason=e.reason, status=e.status, retry_after=e.retry_after)


@dataclass(slots=True)
class Gate:
    settings: AgentSettings
    metrics_rejections: Any

    def __post_init__(self) -> None:
        data_dir = self.settings.resolved_data_dir
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # tenants' data: this user's only
            # The public key now (gossiped), the private key at the first report (node_key.py).
            self.node_key = open_node_key(data_dir)
            nonces = SQLiteNonceStore(data_dir / "nonces.db")
        except OSError as e:
            raise data_dir_error(data_dir, e) from None
        except NodeKeyError as e:  # it names the key file and the fix (chmod 600, or delete it)
            raise StartupError(str(e)) from None
        self.node_pubkey = self.node_key.public_hex
        cluster_cfg = {k: v for k, v in self.settings.model_dump(mode="json").items() if k not in NODE_LOCAL}
        self.measurement = measure(cluster_cfg).value
        try:
            self.holder = RegistryHolder(self.settings.tenants) if self.settings.tenants else None
        except RegistryError as e:  # it names the line and the fix
            raise StartupError(f"--tenants: {e}") from None
        self.admission = Admission(nonces=nonces, rejections=self.metrics_rejections)
        if self.holder is None:
            log.warning("no --tenants registry: open mode; every request is accepted unsigned, and a job's "
                        "tenant is the one it names ('default' if none). Give --tenants FILE to require signed "
                        "requests")

    holder: RegistryHolder | None = None
    admission: Admission | None = None
    node_key: NodeKey | None = None
    node_pubkey: str = ""
    measurement: str = ""

    @property
    def registry(self) -> Any:
        return self.holder.registry if self.holder is not None else None

    def reload(self) -> Reload | None:
        if self.holder is None:
            return None
        result = self.holder.reload()
        self.on_reload(result)
        return result

    def on_reload(self, result: Reload) -> None:
        if result.error:
            log.error("tenant registry not reloaded: %s", result.error)
        elif result.reloaded:
            log.info("tenant registry reloaded: %d tenants", result.tenants)

    def admit(self, spec: JobSpec, auth: Any, *, job_id: str, usage: TenantUsage | None, now: float,
              forwarded: bool = False, module: bytes | None = None) -> Admitted:
        assert self.admission is not None
        try:
            return self.admission.admit(spec, auth, registry=self.registry, job_id=job_id, usage=usage, now=now,
                                        forwarded=forwarded, module=module)
        except AdmissionError as e:
            raise to_agent_error(e) from None

    def authenticate(self, method: str, raw_path: bytes, body: bytes, authorization: str | None,
                     now: float) -> Principal:
        if self.holder is None:
            return OPEN_PRINCIPAL
        assert self.admission is not None
        try:
            return self.admission.authenticate(method, raw_path, body, authorization, registry=self.registry, now=now)
        except AdmissionError as e:
            raise to_agent_error(e) from None

    def check_tenant(self, principal: Principal, tenant: str) -> None:
        """Refuse (403) a listing, count or label cancel of ``tenant``'s jobs that
        ``principal`` may not see."""
        if not principal.may_access(tenant):
            assert self.admission is not None
            raise to_agent_error(self.admission.forbidden_tenant(principal, tenant))

    def attest(self, *, node_id: str, job_id: str, spec: JobSpec, result: SandboxResult, started_at: float,
               ended_at: float) -> dict[str, Any]:
        assert self.node_key is not None
        private = self.node_key.private()
        self.node_pubkey = self.node_key.public_hex  # corrected if node.pub did not match the key
        return report_from_result(private, node_id=node_id, measurement=self.measurement, job_id=job_id,
                                  node_pubkey=self.node_pubkey,
                                  spec=spec, result=result, sandbox_kind=spec.runtime, started_at=started_at,
                                  ended_at=ended_at)
