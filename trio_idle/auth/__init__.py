"""OAuth2: access tokens minted by the backend (`token_backend`) or refreshed by the daemon
itself (`token_refresh`, with a provider's token endpoint as pure code in `oauth_provider` and
the rotated refresh tokens' store in `rotation`), and the pure parts of the operator's sign-in
(`authorization`, driven by `trio-idle oauth authorize`).
"""
