"""The reference PERC endpoint (Twisted side) and the ``perc-endpoint`` CLI.

* :mod:`.kmf`: OAuth login (authorization code + PKCE, certificate-bound
  token), identity assertion and signed roster at the IdP/KMF;
* :mod:`.md`: the MD's conference API (offer in, signed answer out, leave);
* :mod:`.media`: G.711 mu-law, tone/WAV/video-like sources, WAV sinks;
* :mod:`.client`: :class:`~.client.Endpoint`, UDP glue around the sans-I/O
  :class:`~perc_daemons.protocol.participant.ParticipantSession`;
* :mod:`.load`: N endpoints in one process; :mod:`.cli`: ``perc-endpoint``.
"""
