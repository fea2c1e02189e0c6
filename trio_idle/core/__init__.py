"""Foundations every layer uses: settings (`config`), errors, `Secret`, the scrubber, counters,
backoff and connect pacing, log sinks, stored-password decryption, refused destinations, the
garbage-collection policy.

Imports nothing else of trio_idle.
"""
