"""The one broker connection the MQTT interfaces share (:mod:`.connection`: reconnect, TLS,
last wills, retained values)."""
