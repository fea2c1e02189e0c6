"""What a mailbox account is: source rows validated into `MailConnection`s, provider presets,
credentials, and the two places rows come from (PostgreSQL, a TOML file).
"""
