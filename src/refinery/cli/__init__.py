"""The `refinery` command line: one module per noun, each command a call into the library."""
