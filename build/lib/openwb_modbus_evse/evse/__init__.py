"""The Dehne-EVSE side: wire protocol and station link."""
