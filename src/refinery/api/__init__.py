"""HTTP edges: the Segment-compatible collector and the admin API, thin over the library."""
