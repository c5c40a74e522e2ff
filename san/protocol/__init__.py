"""The agent-controller boundary: fault, command and response messages, and their transports."""
