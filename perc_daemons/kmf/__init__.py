"""perc-kmf: IdP/KMF (trusted: identity provider, OAuth 2.0 server, conference database, key service)."""
