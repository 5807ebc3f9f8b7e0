"""Fleet mode: many hosts halted as one through an etcd v3 store (docs/fleet.md). The client,
the key layout and models, and each host's link to the store; no daemon code, so agentctl
can use the client and the models. No privilege."""
