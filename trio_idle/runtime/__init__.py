"""The composition root: the daemon's root nursery, the refresh loop, shared mode, supervision,
the read API for status.
"""
