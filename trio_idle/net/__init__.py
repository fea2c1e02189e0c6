"""Sockets: opening a checked TCP connection (refused networks, happy eyeballs) and the buffered
stream transport that IMAP sessions and the backend HTTP client both read through.
"""
