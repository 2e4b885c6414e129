"""Command-line adapters: argument parsing and file I/O around the stages."""
