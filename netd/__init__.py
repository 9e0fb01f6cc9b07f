"""netd: the bridge network driver of pyengine (IPAM, bridge, veth, firewall, port mapping)."""
