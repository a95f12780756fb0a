"""Developer tools that check the package's own structure (used by ``scripts/`` and the tests)."""
