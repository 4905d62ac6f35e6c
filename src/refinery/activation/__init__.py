"""Activation: syncs that deliver segment membership to destinations, with outboxes, retries,
dead letters and consent gates (docs/activation.md)."""
