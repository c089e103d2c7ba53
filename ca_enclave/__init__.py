"""The Modelyo CA and key service: runs in an SGX enclave (Gramine) or on the simulated platform.

Layers, each testable on its own:
- `sealing`: encrypting state to the enclave's identity (simulated platform or Gramine keys);
- `keyring`: deriving key-encryption keys from sealed master keys;
- `store`: the sealed state directory (CA root, master keys, owner, VMs, policy, audit log);
- `service`: what each endpoint does and who may call it, without HTTP;
- `app`: the FastAPI application over the service;
- `server`: TLS 1.3, uvicorn and the `modelyo-ca` command.

Only the `modelyo` core is imported (see DESIGN.md): the enclave's trusted base stays small.
"""
