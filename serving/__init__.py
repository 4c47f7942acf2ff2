"""Query functions, the HTTP API and the `shopguide` command line."""
