"""OAuth2 access tokens: minted by the backend (`token_backend`) or refreshed by the daemon itself
(`token_refresh`).
"""
