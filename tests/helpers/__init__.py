"""Helpers shared by test modules (processes to start, clients to build)."""
