"""Several instances sharing the mailboxes through PostgreSQL: membership and fencing, the
assignment of mailboxes to members, the LISTEN/NOTIFY trigger.
"""
