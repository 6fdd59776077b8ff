"""perc-kd: Key Distributor (trusted: terminates tunnelled DTLS-SRTP, issues EKT and HBH keys, RFC 8871/9185)."""
