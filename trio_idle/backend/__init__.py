"""Talking to the backend: the scan webhook and its HTTP/1.1 transport."""
