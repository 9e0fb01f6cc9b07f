"""pyengine-bench: userland proxies (pyengine-proxy, docker-proxy, socat) against kernel DNAT,
measured side by side in namespaces the harness builds and removes. See bench/README.md."""
