"""The data path: an aiohttp reverse proxy that routes, balances and holds requests."""
