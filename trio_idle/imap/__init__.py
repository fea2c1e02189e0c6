"""The IMAP protocol: bounded framing, response and envelope parsing, SASL and the IDLE restart
machine as pure code; opening a connection (`connect`); the connection (aioimaplib's parser fed
from trio, contained in one adapter, `aioimap`) and the seam a session talks to (`connector`).
"""
