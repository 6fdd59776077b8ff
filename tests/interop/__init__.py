"""Interop tests: our DTLS engine against OpenSSL (pyOpenSSL and the openssl binary)."""
