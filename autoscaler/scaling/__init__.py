"""The pure core: fleet snapshots, load windows and the scaling policy.

Nothing here does I/O, reads a clock, logs or imports asyncio: time is an argument, so the
same code runs live, in table tests and in the trace simulator.
"""
