"""Test support: real services started on free ports, and waiting helpers."""
