"""The container lifecycle: records, names, create/start/stop/remove and the network glue."""
