"""Wire formats <-> core types. Codecs are pure functions: no I/O, no server state."""
