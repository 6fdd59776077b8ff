"""perc-md: the Media Distributor.

Semi-trusted SFU: removes and re-applies only the hop-by-hop SRTP layer
(RFC 8723 section 5.2, RFC 8871 section 3).
"""
