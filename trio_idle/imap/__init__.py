"""The IMAP protocol: bounded framing and response parsing as pure code, the IDLE-restart answers,
SASL, the connection (aioimaplib's parser fed from trio, contained in one adapter) and the seam a
session talks to (`connector`).
"""
