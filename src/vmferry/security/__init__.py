"""Certificates, identities and roles, the audit log. (Delegation tickets come later.)"""

from vmferry.security.pki import CertificateAuthority, CertPaths, Revocations, verify_crl
from vmferry.security.roles import Principal, Role

__all__ = ["CertPaths", "CertificateAuthority", "Principal", "Revocations", "Role", "verify_crl"]
