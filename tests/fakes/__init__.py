"""Test doubles: a fake package index and hand-built distributions."""
