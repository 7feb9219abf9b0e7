"""Who may do what, and proof of what ran where.

* ``tenants``: the tenant registry (TOML) and its reloading holder.
* ``reloader``: the trio task that reloads it on SIGHUP and on file change.
* ``keys``: Ed25519 key files and the canonical JSON every signature covers.
* ``signing``: signed job envelopes (client side and first verification).
* ``request_auth``: the signed ``Authorization`` header for reads and cancels.
* ``nonces``: the replay memory, bound to job ids.
* ``admission``: the sans-IO admission checker (auth, nonce, capabilities, quota, rate).
* ``errors``: every refusal reason with its HTTP status.
* ``attestation``: node key, measurement, signed attestation reports.
* ``tls``: the cluster CA, node certificates and mutual-TLS contexts.
* ``client``: what the p2psched client uses to sign as a tenant.

The threat model is in docs/security.md.
"""
