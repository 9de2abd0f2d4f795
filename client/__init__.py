"""A light Python client for monaserve; imports no torch."""
