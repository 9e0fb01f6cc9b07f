"""The parts of netd's controller (netd/controller.py is the facade that joins them): shared
state, networks, published ports, endpoints, recovery at setup."""
