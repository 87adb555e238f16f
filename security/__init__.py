"""Cluster identities: the CA, certificates, TLS credentials and who may call what."""
