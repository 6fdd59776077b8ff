"""perc-md: Media Distributor (semi-trusted SFU: hop-by-hop SRTP only, RFC 8871 section 3)."""
