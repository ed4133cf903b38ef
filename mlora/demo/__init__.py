"""The embedded default: small tasks whose data ships in the package, for the demo and tests."""
