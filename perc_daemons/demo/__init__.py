"""Runnable demonstrations of the PERC protocol pieces (no network, no daemons)."""
