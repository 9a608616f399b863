"""The name-constrained interception CA and its leaf certificates (cryptography).

authority: the CA (DIR/ca.pem, DIR/ca.key); leaves: per-host leaves and server ssl contexts;
trust: the system trust store plus the CA, for SSL_CERT_FILE; names: which hosts may be signed.

Invariants: this room stands on the ground floor only (config, handles, units, metrics); nothing
here does network I/O; no key is ever signed for, or served to, a name outside the CA's constraints.
"""
