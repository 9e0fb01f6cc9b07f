"""The namespace lab: two pyengined daemons (userland proxy and kernel DNAT) and a client namespace
for the exercises in docs/lab.md. A harness around the engine, not part of it."""
