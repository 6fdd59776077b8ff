"""perc-kmf: the IdP/KMF.

Trusted: identity provider, OAuth 2.0 authorization server, conference
database and key service.
"""
