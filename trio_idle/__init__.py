"""trio-idle: one persistent IMAP IDLE session per mailbox, new mail → scan webhook."""

__version__ = "0.1.0"
