"""A Fly Machines API emulator whose machines are real local processes.

It plays Fly for the demo, the tests and users: the seed spec's API on one side, processes
listening on their own loopback address on the other. It imports nothing of the proxy,
the controller or the client.
"""

from autoscaler.emulator.persist import StateFileError
from autoscaler.emulator.server import Emulator

__all__ = ["Emulator", "StateFileError"]
