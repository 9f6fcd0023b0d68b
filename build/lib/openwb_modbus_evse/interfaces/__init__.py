"""The controller interfaces: each translates its wire format onto the control path and the
view, and nothing more."""
