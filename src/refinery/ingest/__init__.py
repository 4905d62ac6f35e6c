"""Ingest: the Segment protocol, cleaning into zones, tracking plans, batch import, replay, catalog."""
