"""Command line: thin parsers that validate and call the library."""
