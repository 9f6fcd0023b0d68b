"""MQTT interfaces of the service, all on one broker connection (:mod:`.connection`).

- :mod:`.connection`: the connection manager (reconnect, TLS, last wills, retained values).
"""
