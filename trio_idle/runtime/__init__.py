"""The composition root: the daemon's root nursery, the refresh loop, supervision, the read
API for status, garbage-collection policy.
"""
