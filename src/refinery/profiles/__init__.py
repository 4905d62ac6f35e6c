"""Profiles: the curated zone's people, built on the identity graph.

`build` attributes every clean event to a profile and merges traits by a declared policy into the
`profiles` table; `read` looks profiles up by id or by any identifier, lists their event timeline
and explains how they were formed.
"""
