"""The engine API: protocol-free requests in, events and results out; tokenizing, validation, limits, admission."""
