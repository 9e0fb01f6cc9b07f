"""pyengine-cni: netd as a CNI plugin (CNI spec 1.0.0; 0.4.0 and 1.1.0 negotiated).

One invocation is one command (ADD, DEL, CHECK, VERSION, STATUS, GC) for one network, read from
the environment and the network configuration on stdin (CNI SPEC.md, "Protocol parameters").
The network is netd's default network of a controller whose state lives under the network's
data directory, so the bridge, veths, IPAM, firewall and port publishing are netd's own.
Modules: config (parsing at the boundary), errors and results (the spec's JSON), lock (one
flock per network), records (the attachments and their proxies), proxies (pyengine-proxy
processes that outlive the plugin), controller (netd's controller for a runtime's
namespace), chained (the network of a plugin chained after ``bridge``), commands (the
commands), main (the entry point).
"""
