"""perc-kd: the Key Distributor.

Trusted: terminates the endpoints' tunnelled DTLS-SRTP handshakes, gives
endpoints the EKT key and the MD only hop-by-hop keys (RFC 8871, RFC 9185).
"""
