"""Wire protocols on top of the engine API: field mapping, and the one place errors become status codes."""
