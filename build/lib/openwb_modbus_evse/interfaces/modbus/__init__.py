"""The controller side: openWB Rev2.0 register map and Modbus TCP server."""
