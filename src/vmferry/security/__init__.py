"""Certificates and identities. (Roles and delegation tickets come with the security issue.)"""

from vmferry.security.pki import CertificateAuthority, CertPaths

__all__ = ["CertPaths", "CertificateAuthority"]
