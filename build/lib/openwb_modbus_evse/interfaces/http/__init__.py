"""The HTTP side: /metrics, the status page and its JSON API, and the admin actions."""
