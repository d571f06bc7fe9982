"""Wire protocol: frames (the Python face of the native codec), metadata encoding, error codes."""
