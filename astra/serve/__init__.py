"""`astra serve`: an OpenAI-compatible HTTP API in front of one persistent device group."""
