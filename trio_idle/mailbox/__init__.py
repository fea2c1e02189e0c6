"""One mailbox's life: the session (connect, SELECT, IDLE, tick, reconnect), the process-wide
ticker, scan coalescing and the scan worker, account health, and the reconciler that keeps one
session per connection row.
"""
