"""The application layer's helpers (command line, demo): they may use every other layer."""
