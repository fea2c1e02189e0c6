"""What was scanned, kept across restarts: the accepted scan ranges (pure) and the stores
(SQLite, PostgreSQL, memory).
"""
