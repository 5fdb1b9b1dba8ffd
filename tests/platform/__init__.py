"""The platform under every service: transport, tokens, start-up."""
