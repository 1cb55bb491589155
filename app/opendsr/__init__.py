"""The OpenDSR processor interface's own parts: the processor's signing identity."""
