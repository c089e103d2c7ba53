"""Clients of the Modelyo services (the CA, and later the TDX agent)."""
