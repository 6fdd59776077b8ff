"""Registers the perc-md, perc-kd and perc-kmf twistd plugins.

This directory has no ``__init__.py`` on purpose: it extends Twisted's own
``twisted.plugins`` namespace (see twisted.plugin).
"""

from twisted.application.service import ServiceMaker

perc_md = ServiceMaker(
    "PERC Media Distributor",
    "perc_daemons.md.service",
    "Semi-trusted media distributor: forwards double-encrypted SRTP, hop-by-hop keys only.",
    "perc-md",
)
perc_kd = ServiceMaker(
    "PERC Key Distributor",
    "perc_daemons.kd.service",
    "Trusted key distributor: tunnelled DTLS-SRTP, EKT keys to endpoints, HBH keys to MDs.",
    "perc-kd",
)
perc_kmf = ServiceMaker(
    "PERC IdP/KMF",
    "perc_daemons.kmf.service",
    "Trusted identity provider and key management function.",
    "perc-kmf",
)
