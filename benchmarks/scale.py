"""Stand-in, filled in below."""
