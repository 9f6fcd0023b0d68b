"""Serves Dehne-EVSE charging stations as openWB series2 charge points over Modbus TCP."""
